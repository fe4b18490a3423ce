"""A BatchNorm module's arguments for the fused C++ CPU paths that run its batch norm inside a bigger op
(embedding_concat_dropout with bn_cont, LinBnDrop): fastfuse_C::embedding_concat_dropout_bn, fastfuse_C::lin_bn_drop.
Those update the running statistics in C++ with batch_norm()'s own ATen ops (csrc/cpu/bn_module.h)."""
import torch

from .batch_norm import _check, module_bn_args


def cpp_bn_args(bn, x: torch.Tensor, training: bool, pre_act=None, dropout_p: float = 0.0):
    """(running_mean, running_var, num_batches_tracked, batch_stats, update, momentum, eps, weight, bias) for the
    C++ ops, after batch_norm()'s checks (same errors); None where the fused path does not apply (running
    statistics in another dtype than the batch statistics: batch_norm() updates those through a copy)."""
    rm, rv, weight, bias, batch_stats, momentum, eps, nbt = module_bn_args(bn, training)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if (rm is not None and rm.dtype != acc) or (rv is not None and rv.dtype != acc):
        return None
    _check(x, rm, rv, weight, bias, None, batch_stats, momentum, eps, pre_act, None, nbt)
    batch_stats = bool(batch_stats)
    return (rm, rv, nbt, batch_stats, batch_stats and rm is not None, None if momentum is None else float(momentum),
            float(eps), weight, bias)
