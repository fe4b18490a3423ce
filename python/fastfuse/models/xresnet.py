"""fastai's XResNet (the "bag of tricks" ResNet) on fastfuse's layers, with reflection padding in every convolution.

Same signatures, children, init and state_dict keys as fastai.vision.models.xresnet, so checkpoints load both ways
and give the same eval outputs under the same padding. padding_mode (default 'reflect') reaches every convolution,
the three stem convolutions included (fastai's own `padding_mode` argument only reaches the ResBlocks);
padding_mode='zeros' builds fastai's zero-padded model."""
import inspect

import torch
from torch import nn

from ..nn.pooling import AdaptiveAvgPool, Flatten, MaxPool
from ..nn.reflect_conv2d import ConvLayer
from ..nn.resblock import ResBlock, delegated_signature

__all__ = ["XResNet", "init_cnn", "min_input_size", "xresnet18", "xresnet34", "xresnet50", "xresnet101"]

_PRETRAINED_URL = "https://s3.amazonaws.com/fast-ai-modelzoo/xrn50_940.pth"  # fastai's (xresnet50 only)
_PAD_ERROR = "Padding size should be less than"  # torch's and reflect_conv2d's message


def init_cnn(m):
    """fastai's init_cnn: every bias 0 (batch norms' too), kaiming_normal_ for the weights of convs and linears."""
    if getattr(m, "bias", None) is not None:
        nn.init.constant_(m.bias, 0)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight)
    for child in m.children():
        init_cnn(child)


class XResNet(nn.Sequential):
    """fastai's XResNet: a 3-conv stem, a max pool, the stages of `block`s, then pool, flatten, dropout and a linear.
    Same arguments as fastai's (the rest go to every block), plus `padding_mode`, which reaches every convolution.

    A feature map must be wider than the padding to be reflected: a reflection-padded XResNet fed too small an
    input raises a ValueError that names the smallest input size it takes (min_input_size)."""

    def __init__(self, block, expansion, layers, p=0.0, c_in=3, n_out=1000, stem_szs=(32, 32, 64), widen=1.0,
                 sa=False, act_cls=nn.ReLU, ndim=2, ks=3, stride=2, *, padding_mode="reflect", **kwargs):
        if ks % 2 == 0:
            raise Exception("kernel size has to be odd!")
        stem_szs = [c_in, *stem_szs]
        stem = [ConvLayer(stem_szs[i], stem_szs[i + 1], ks=ks, stride=stride if i == 0 else 1, act_cls=act_cls,
                          ndim=ndim, padding_mode=padding_mode)
                for i in range(3)]
        block_szs = [int(o * widen) for o in [64, 128, 256, 512] + [256] * (len(layers) - 4)]
        block_szs = [64 // expansion] + block_szs
        kw = dict(block=block, expansion=expansion, act_cls=act_cls, ndim=ndim, ks=ks, padding_mode=padding_mode)
        blocks = [self._make_layer(ni=block_szs[i], nf=block_szs[i + 1], blocks=n, stride=1 if i == 0 else stride,
                                   sa=sa and i == len(layers) - 4, **kw, **kwargs)
                  for i, n in enumerate(layers)]
        super().__init__(*stem, MaxPool(ks=ks, stride=stride, padding=ks // 2, ndim=ndim), *blocks,
                         AdaptiveAvgPool(sz=1, ndim=ndim), Flatten(), nn.Dropout(p),
                         nn.Linear(block_szs[-1] * expansion, n_out))
        self.block, self.expansion, self.act_cls, self.ndim, self.ks = block, expansion, act_cls, ndim, ks
        self.padding_mode = padding_mode
        init_cnn(self)

    @staticmethod
    def _make_layer(ni, nf, blocks, stride, sa, block, expansion, act_cls, ndim, ks, **kwargs):
        return nn.Sequential(*[block(expansion, ni if i == 0 else nf, nf, stride=stride if i == 0 else 1,
                                     sa=sa and i == (blocks - 1), act_cls=act_cls, ndim=ndim, ks=ks, **kwargs)
                               for i in range(blocks)])

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a slice is a plain Sequential (nn.Sequential would call XResNet(OrderedDict))
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def forward(self, x):
        try:
            return super().forward(x)
        except RuntimeError as e:
            if _PAD_ERROR not in str(e):
                raise
            raise ValueError(_too_small_message(self, x)) from None


# fastai's signature: the ResBlock arguments XResNet does not take itself, keyword-only (padding_mode among them)
_OWN = inspect.signature(XResNet.__init__).parameters
_BLOCK = inspect.signature(ResBlock.__init__).parameters
delegated_signature(XResNet.__init__, [(n, p.default) for n, p in _BLOCK.items()
                                       if p.default is not p.empty and (n not in _OWN or n == "padding_mode")])


def _too_small_message(model, x):
    size = "x".join(map(str, x.shape[2:]))
    n = min_input_size(model)
    side = "x".join([str(n)] * (x.dim() - 2))
    return (f"{type(model).__name__}: a {size} input is too small for reflection padding: a feature map shrinks to "
            f"no more pixels than a convolution's padding, which cannot be reflected. The smallest input this model "
            f"takes is {side}: resize the images to at least that, or build the model with padding_mode='zeros'.")


# ---- the smallest input: each spatial side through the model's layers, in forward order ---------------------------
class _TooSmall(Exception):
    pass


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def _conv_side(conv, n):
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    p = 0 if isinstance(conv.padding, str) else conv.padding[0]
    if isinstance(conv.padding, str) and conv.padding == "same":
        p = d * (k - 1) // 2
    if conv.padding_mode == "reflect" and p >= n:
        raise _TooSmall
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise _TooSmall
    return out


def _pool_side(pool, n):
    k, p = _first(pool.kernel_size), _first(pool.padding)
    s = _first(pool.stride) or k
    num = n + 2 * p - k
    out = (-(-num // s) if getattr(pool, "ceil_mode", False) else num // s) + 1
    if out < 1:
        raise _TooSmall
    return out


_STOP = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
         nn.AdaptiveMaxPool3d, nn.Flatten, Flatten, nn.Linear)


def _side(m, n):
    """The side of m's output for an input side n (None once the map is pooled or flattened away); _TooSmall where
    a reflection-padded convolution meets a map no wider than its padding."""
    if isinstance(m, _STOP):
        return None
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_side(m, n)
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return _pool_side(m, n)
    if isinstance(m, ResBlock) or type(m).__name__ == "ResBlock":  # the idpath ends at the convpath's size
        return _side(m.convpath, n)
    for child in m.children():  # Sequential-like: the children in order; layers without one keep the size
        n = _side(child, n)
        if n is None:
            return None
    return n


def min_input_size(model, limit=4096):
    """The smallest side n such that an n x n (x n) input passes model's reflection-padded convolutions (every side
    from n up to 2n does too); None when none up to `limit` does. Read from the layers' sizes, nothing is run.
    Walks Sequential-style models (their children in order), ConvLayers and ResBlocks, as fastai's and fastfuse's
    XResNets and the bodies cut from them are."""
    def fits(n):
        try:
            _side(model, n)
            return True
        except _TooSmall:
            return False
    for n in range(1, limit + 1):
        if all(fits(m) for m in range(n, 2 * n + 1)):
            return n
    return None


def _xresnet(pretrained, expansion, layers, **kwargs):
    res = XResNet(ResBlock, expansion, layers, **kwargs)
    if pretrained:  # fastai's: its only pretrained weights are xresnet50's (zero-padded training), loaded non-strict
        if expansion != 4 or list(layers) != [3, 4, 6, 3]:
            raise ValueError("pretrained weights exist only for xresnet50 (fastai's xrn50_940.pth)")
        state = torch.hub.load_state_dict_from_url(_PRETRAINED_URL, map_location="cpu")["model"]
        res.load_state_dict(state, strict=False)
    return res


def xresnet18(pretrained=False, **kwargs):
    return _xresnet(pretrained, 1, [2, 2, 2, 2], **kwargs)


def xresnet34(pretrained=False, **kwargs):
    return _xresnet(pretrained, 1, [3, 4, 6, 3], **kwargs)


def xresnet50(pretrained=False, **kwargs):
    return _xresnet(pretrained, 4, [3, 4, 6, 3], **kwargs)


def xresnet101(pretrained=False, **kwargs):
    return _xresnet(pretrained, 4, [3, 4, 23, 3], **kwargs)
