import torch

from ..ops.batch_norm import module_bn_args
from ..ops.lin_bn_drop import lin_bn_drop
from ._hooks import hooked
from .batch_norm import BatchNorm1d, is_fused_bn
from .dropout import Dropout
from .fused_sequential import FusedSequential

_DROPOUTS = (torch.nn.Dropout, Dropout)


class LinBnDrop(FusedSequential):
    """fastai's LinBnDrop (same signature, child order and state_dict keys): lin_first=True is
    [Linear(bias=not bn), act, BatchNorm1d, Dropout], else [BatchNorm1d, Dropout, Linear, act].
    [Linear(bias=False), ReLU?, BatchNorm1d, Dropout?] runs as one fastfuse.lin_bn_drop call; any other block as a
    FusedSequential (the BatchNorm, a ReLU before it and the Dropout after it in one fastfuse.batch_norm call)."""

    def __init__(self, n_in, n_out, bn=True, p=0., act=None, lin_first=False):
        layers = [BatchNorm1d(n_out if lin_first else n_in)] if bn else []
        if bn:  # fastai's BatchNorm(): weight 1, bias 1e-3
            layers[0].bias.data.fill_(1e-3)
        if p != 0:
            layers.append(Dropout(p))
        lin = [torch.nn.Linear(n_in, n_out, bias=not bn)]
        if act is not None:
            lin.append(act)
        super().__init__(*(lin + layers if lin_first else layers + lin))

    def forward(self, input):
        mods = list(self._modules.values())
        args = _lin_bn_drop_args(mods, input)
        return super().forward(input) if args is None else lin_bn_drop(input, *args[:-1], **args[-1])


def _lin_bn_drop_args(mods, x):
    """fastfuse.lin_bn_drop's arguments for [Linear(bias=False), ReLU?, BatchNorm1d, Dropout?] on a 2-D input, by the
    rules of FusedSequential for the modes (an eval BatchNorm keeps a training Dropout apart); None otherwise, and
    for hooked children (their own calls run their hooks)."""
    n = len(mods)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not 2 <= n <= 4 or type(mods[0]) is not torch.nn.Linear:
        return None
    lin, i = mods[0], 1
    pre = type(mods[1]) is torch.nn.ReLU
    i += pre
    if lin.bias is not None or i >= n or not is_fused_bn(mods[i]) or not isinstance(mods[i], torch.nn.BatchNorm1d):
        return None
    bn, p = mods[i], 0.0
    if i + 1 < n:
        drop = mods[i + 1]
        if type(drop) not in _DROPOUTS or i + 2 != n or (drop.training and not bn.training):
            return None
        p = drop.p if drop.training else 0.0
    if x.shape[1] != lin.weight.shape[1] or x.dtype != lin.weight.dtype or hooked(mods):
        return None
    rm, rv, weight, bias, training, momentum, eps, nbt = module_bn_args(bn, bn.training)
    return (lin.weight, rm, rv, weight, bias, training, momentum, eps,
            dict(pre_act="relu" if pre else None, dropout_p=p, num_batches_tracked=nbt))
