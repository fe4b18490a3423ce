import torch

from .. import _backends
from ..ops._bn_module import cpp_bn_args
from .batch_norm import BatchNorm1d, is_fused_bn
from .dropout import Dropout
from ._hooks import hooked
from .fused_sequential import FusedSequential

_DROPOUTS = (torch.nn.Dropout, Dropout)


class LinBnDrop(FusedSequential):
    """fastai's LinBnDrop (same signature, child order and state_dict keys): lin_first=True is
    [Linear(bias=not bn), act, BatchNorm1d, Dropout], else [BatchNorm1d, Dropout, Linear, act]. The BatchNorm,
    a ReLU act before it and the Dropout after it run as one fused fastfuse.batch_norm; on CPU in eager mode,
    [Linear(bias=False), ReLU?, BatchNorm1d, Dropout?] runs as one autograd node (fastfuse_C::lin_bn_drop)."""

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
        out = _fused_cpu(list(self), input)
        return super().forward(input) if out is None else out


_FLOATS = (torch.float32, torch.float64)


# ---- eager CPU: the whole block in one C++ call each way ----------------------------------------------------
# fastfuse_C::lin_bn_drop (csrc/cpu/lin_bn_drop_kernel.cpp): y = x W^T, then the fused ReLU -> BN -> dropout of
# fastfuse.batch_norm (same kernels, masks and running statistics), in one autograd node (C++:
# csrc/cpu/lin_bn_drop_autograd.cpp) instead of the Linear's two and the batch norm's, with their Python.
# The checks read the modules' dicts directly: through Module.__getattr__ this Python cost ~35 us a call at batch 64,
# about a tenth of the block's kernels.
def _fused_cpu(mods, x):
    """The block through fastfuse_C::lin_bn_drop where it applies (eager, the cpp backend, a 2-D float32/64 input and
    [Linear(bias=False), ReLU?, BatchNorm1d, Dropout?] with fused_forward's rules for the modes); None otherwise."""
    n = len(mods)
    if (type(x) is not torch.Tensor or x.dim() != 2 or not x.is_cpu or not x.is_contiguous()
            or x.dtype not in _FLOATS or not 2 <= n <= 4 or torch.compiler.is_compiling()):
        return None
    lin, i = mods[0], 1
    pre = type(mods[1]) is torch.nn.ReLU
    i += pre
    if type(lin) is not torch.nn.Linear or i >= n:  # exactly Linear: its weight and bias live in _parameters
        return None
    weight, bias = lin._parameters.get("weight"), lin._parameters.get("bias")
    bn = mods[i]
    if (bias is not None or weight is None or weight.dtype != x.dtype or not is_fused_bn(bn)
            or not isinstance(bn, torch.nn.BatchNorm1d)):
        return None
    i += 1
    p = 0.0
    if i < n:
        drop = mods[i]
        if type(drop) not in _DROPOUTS or i + 1 != n:
            return None
        if drop.training:
            if not bn.training:
                return None  # fused_forward runs this dropout on its own
            p = drop.p
    if p >= 1 or x.shape[1] != weight.shape[1] or _backends.select(x) != "cpp":
        return None
    if hooked(mods):
        return None  # the children's own calls run their hooks
    bn_args = cpp_bn_args(bn, (x.shape[0], weight.shape[0]), x.dtype, bn.training, "relu" if pre else None)
    if bn_args is None:
        return None
    *bn_args, bn_weight, bn_bias = bn_args
    p = p if bn.training else 0.0
    # seed None: the op draws it as _rng.new_seed() would (csrc/cpu/seed.h)
    return torch.ops.fastfuse_C.lin_bn_drop(x, weight, bn_weight, bn_bias, *bn_args, pre, p, None, None)[0]
