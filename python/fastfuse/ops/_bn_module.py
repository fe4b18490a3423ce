"""A BatchNorm module's arguments for the fused C++ CPU paths that run its batch norm inside a bigger op
(embedding_concat_dropout with bn_cont, LinBnDrop): fastfuse_C::embedding_concat_dropout_bn, fastfuse_C::lin_bn_drop.
Those update the running statistics in C++ with batch_norm()'s own ATen ops (csrc/cpu/bn_module.h)."""
import torch

from .batch_norm import _check, module_bn_args

_BatchNorm = torch.nn.modules.batchnorm._BatchNorm


def cpp_bn_args(bn, shape, dtype: torch.dtype, training: bool, pre_act=None):
    """(running_mean, running_var, num_batches_tracked, batch_stats, update, momentum, eps, weight, bias) for the
    C++ ops, whose batch norm input is a (rows, C) CPU tensor of `dtype` (float32/64), after batch_norm()'s checks
    (same errors); None where the fused path does not apply (running statistics in another dtype than the batch
    statistics: batch_norm() updates those through a copy)."""
    if isinstance(bn, _BatchNorm):
        args = _lean_args(bn, shape, dtype, training)
        if args is not None:
            return args
    return _general_args(bn, shape, dtype, training, pre_act)


def _general_args(bn, shape, dtype, training, pre_act):
    """Anything else, and every error: module_bn_args and batch_norm()'s own checks on a 0-stride stand-in of the
    input."""
    x = torch.empty((), dtype=dtype).expand(*shape)
    rm, rv, weight, bias, batch_stats, momentum, eps, nbt = module_bn_args(bn, training)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if (rm is not None and rm.dtype != acc) or (rv is not None and rv.dtype != acc):
        return None
    _check(x, rm, rv, weight, bias, None, batch_stats, momentum, eps, pre_act, None, nbt)
    return _pack(rm, rv, nbt, bool(batch_stats), momentum, eps, weight, bias)


def _pack(rm, rv, nbt, batch_stats, momentum, eps, weight, bias):
    return (rm, rv, nbt, batch_stats, batch_stats and rm is not None, None if momentum is None else float(momentum),
            float(eps), weight, bias)


def _lean_args(bn, shape, dtype, training):
    """module_bn_args + _check for a torch BatchNorm module in the common case, read straight from its dicts
    (Module.__getattr__ and _check's general checks cost ~13 us a call, as much as a (64, 1000) kernel). None when
    anything is unusual: the general path then decides, and raises the errors."""
    d = bn.__dict__
    bufs, params = d["_buffers"], d["_parameters"]
    rm, rv = bufs.get("running_mean"), bufs.get("running_var")
    if not {"track_running_stats", "momentum", "eps"} <= d.keys():
        return None
    track, momentum, eps = d["track_running_stats"], d["momentum"], d["eps"]
    if track is not True and track is not False:
        return None
    batch_stats = training or (rm is None and rv is None)
    if training and not track:  # torch passes the running statistics only in eval or when tracking
        rm = rv = None
    nbt = bufs.get("num_batches_tracked") if training and track else None
    rows, C = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if (rm is None) != (rv is None) or (rm is not None and (rm.dtype != acc or rv.dtype != acc)):
        return None
    if type(eps) is not float or not eps > 0 or (momentum is not None and type(momentum) is not float):
        return None
    if batch_stats and (rows <= 1 or (momentum is None and rm is not None and nbt is None)):
        return None
    weight, bias = params.get("weight"), params.get("bias")
    for t in (rm, rv, weight, bias):
        if t is not None and (t.numel() != C or not t.is_cpu or not t.is_floating_point()):
            return None
    return _pack(rm, rv, nbt, batch_stats, momentum, eps, weight, bias)
