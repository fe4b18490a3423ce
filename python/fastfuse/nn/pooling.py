"""fastai's pooling and flattening layers (same names, children, repr and behaviour), so that heads and bodies built
here print and load as fastai's."""
import torch
from torch import nn


class AdaptiveConcatPool2d(nn.Module):
    """fastai's AdaptiveConcatPool2d: [max pool, average pool] to `size` (default 1), concatenated on the channels
    (2C channels out, the max first)."""

    def __init__(self, size=None):
        super().__init__()
        self.size = size or 1
        self.ap = nn.AdaptiveAvgPool2d(self.size)
        self.mp = nn.AdaptiveMaxPool2d(self.size)

    def forward(self, x):
        return torch.cat([self.mp(x), self.ap(x)], 1)


class Flatten(nn.Module):
    """fastai's Flatten: (B, ...) -> (B, -1), or to one dimension with `full` (same repr: Flatten(full=False))."""

    def __init__(self, full=False):
        super().__init__()
        self.full = full

    def forward(self, x):
        return x.view(-1) if self.full else x.view(x.size(0), -1)

    def extra_repr(self):
        return f"full={self.full!r}"


def AvgPool(ks=2, stride=None, padding=0, ndim=2, ceil_mode=False):  # noqa: N802  (fastai's name)
    """fastai's AvgPool: nn.AvgPool{ndim}d."""
    assert 1 <= ndim <= 3
    return getattr(nn, f"AvgPool{ndim}d")(ks, stride=stride, padding=padding, ceil_mode=ceil_mode)


def MaxPool(ks=2, stride=None, padding=0, ndim=2, ceil_mode=False):  # noqa: N802  (fastai's name)
    """fastai's MaxPool: nn.MaxPool{ndim}d (ceil_mode is ignored, as in fastai)."""
    assert 1 <= ndim <= 3
    return getattr(nn, f"MaxPool{ndim}d")(ks, stride=stride, padding=padding)


def AdaptiveAvgPool(sz=1, ndim=2):  # noqa: N802  (fastai's name)
    """fastai's AdaptiveAvgPool: nn.AdaptiveAvgPool{ndim}d."""
    assert 1 <= ndim <= 3
    return getattr(nn, f"AdaptiveAvgPool{ndim}d")(sz)
