"""Drop-in BatchNorm1d/2d/3d: torch's classes (same arguments, repr, state_dict keys, checkpoints load both ways)
with a forward that runs fastfuse.batch_norm, and optional fused neighbours for FusedSequential."""
import torch

from .. import _backends
from ..ops._bn_module import _lean_args
from ..ops.batch_norm import module_batch_norm

_ACTS = {None: False, "relu": True}


class _FusedBatchNormMixin:
    def forward(self, input, *, pre_act=None, residual=None, post_act=None, dropout_p=0.0):
        """bn(input) as torch computes it; the keyword arguments fuse the neighbours of fastfuse.batch_norm."""
        self._check_input_dim(input)
        out = _cpp_forward(self, input, pre_act, residual, post_act, dropout_p)
        if out is not None:
            return out
        return module_batch_norm(self, input, self.training, pre_act=pre_act, residual=residual,
                                 post_act=post_act, dropout_p=dropout_p)


# ---- eager CPU: one C++ call each way -----------------------------------------------------------------------
# fastfuse_C::bn_module (csrc/cpu/bn_module_kernel.cpp) runs what module_batch_norm runs on the cpp backend (the same
# kernels, route, masks and running-statistics ops, so the same bits) in one C++ autograd node: through
# fastfuse.batch_norm the Python around the kernels cost ~100 us forward and ~110 us backward per call, which made
# small convolutional models train slower than with torch's BatchNorm.
def _cpp_forward(bn, x, pre_act, residual, post_act, p):
    """The module's forward through fastfuse_C::bn_module where it applies (eager, a CPU tensor on the cpp backend,
    the common module configurations, valid options); None otherwise: module_batch_norm then runs it, or raises
    batch_norm()'s error."""
    if (not _backends.eager_cpp(x) or pre_act not in _ACTS or post_act not in _ACTS or type(p) not in (float, int)
            or not 0 <= p < 1):
        return None
    if residual is not None and (type(residual) is not torch.Tensor or residual.shape != x.shape
                                 or residual.dtype != x.dtype or not residual.is_cpu):
        return None
    C = x.shape[1]
    if C == 0 or not x.is_floating_point():
        return None
    args = _lean_args(bn, (x.numel() // C, C), x.dtype, bn.training)
    if args is None:
        return None
    rm, rv, nbt, batch_stats, update, momentum, eps, weight, bias = args
    # batch_norm(): dropout only with batch statistics; seed None: the op draws it as _rng.new_seed() would
    return torch.ops.fastfuse_C.bn_module(x, weight, bias, rm, rv, nbt, residual, batch_stats, update, momentum, eps,
                                          _ACTS[pre_act], _ACTS[post_act], float(p) if batch_stats else 0.0, None,
                                          None)[0]


class BatchNorm1d(_FusedBatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d ((N, C) or (N, C, L) input)."""


class BatchNorm2d(_FusedBatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d ((N, C, H, W) input, contiguous or channels_last)."""


class BatchNorm3d(_FusedBatchNormMixin, torch.nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d ((N, C, D, H, W) input, contiguous or channels_last_3d)."""


def is_fused_bn(m) -> bool:
    return isinstance(m, _FusedBatchNormMixin)
