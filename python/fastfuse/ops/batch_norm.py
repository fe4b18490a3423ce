"""fastfuse.batch_norm: dropout(post_act(bn(pre_act(x)) + residual)) in two passes forward, two backward.

A call: batch_norm() checks its arguments and calls fastfuse::batch_norm, which also updates the running
statistics. Its autograd (csrc/batch_norm.cpp) and kernels (csrc/cpu/batch_norm_kernel.cpp,
csrc/cuda/batch_norm_kernel.cu, both composing the four primitives of csrc/batch_norm.h)
are C++. This file holds the fake kernels and the Python backends (triton, reference), which compose the same four
primitives (signatures of fastfuse.reference.bn_*)."""
import torch

from .. import _backends, _extension, _layout, _rng, reference


def _kernels(backend):
    if backend == "triton":
        from ..triton_kernels import batch_norm as tk  # lazily: triton is optional and slow to import
        return tk
    return reference


def _acc_vec(t, acc, C, fill, like):
    return t.to(acc) if t is not None else torch.full((C,), fill, dtype=acc, device=like.device)


def _grad_dtype(weight, x):
    return weight.dtype if weight is not None else _rng.acc_dtype(x.dtype)


def _python_forward(backend):
    """The op on a Python backend: its four primitives (fastfuse.reference.bn_* or the Triton kernels) and the O(C)
    arithmetic between them, as csrc/batch_norm.h composes the C++ ones; the running statistics by the C++
    update."""
    def forward(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, momentum, eps,
                pre_relu, post_relu, p, seed):
        k = _kernels(backend)
        x = _layout.channel_dense(x)
        acc, C = _rng.acc_dtype(x.dtype), x.shape[1]
        if training:
            mean, var = k.bn_stats(x, pre_relu)
        else:  # copies: an op's outputs must not alias its inputs
            mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
        if training and running_mean is not None:
            torch.ops.fastfuse_C.bn_update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                                         mean, var, x.numel() // C)
        if x.numel() == 0 or p >= 1:
            return torch.zeros_like(x), mean, var
        scale = torch.rsqrt(var + eps) * _acc_vec(weight, acc, C, 1.0, x)
        if residual is not None:
            residual = _layout.to_strides(residual, x.stride())
        key, offset = _rng.seed_ints(seed) if p > 0 else (0, 0)
        out = k.bn_apply(x, mean, scale, _acc_vec(bias, acc, C, 0.0, x), residual, pre_relu, post_relu, p, key,
                         offset)
        return out, mean, var
    return forward


def _python_backward(backend):
    def backward(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask):
        k = _kernels(backend)
        x = _layout.channel_dense(x)
        grad_out = _layout.to_strides(grad_out, x.stride())
        out = _layout.to_strides(out, x.stride()) if out is not None else None
        acc, C = _rng.acc_dtype(x.dtype), x.shape[1]
        need_gi, need_gw, need_gb, need_gr = mask
        wdt = _grad_dtype(weight, x)
        empty = x.new_empty(0)
        if x.numel() == 0 or p >= 1:  # the output was all zeros: nothing flows back
            z = lambda need, t: torch.zeros_like(t) if need else empty  # noqa: E731
            return z(need_gi, x), z(need_gw, mean).to(wdt), z(need_gb, mean).to(wdt), z(need_gr, x)
        key, offset = _rng.seed_ints(seed) if p > 0 else (0, 0)
        invstd = torch.rsqrt(var + eps)
        sum_g = sum_gxmu = None
        gi = gr = empty
        if need_gw or need_gb or (training and need_gi):
            sum_g, sum_gxmu = k.bn_grad_reduce(grad_out, x, out, mean, pre_relu, post_relu, p, key, offset)
        if need_gi or need_gr:
            k1 = invstd * _acc_vec(weight, acc, C, 1.0, x)
            if training and need_gi:  # d/dx of the batch statistics
                n = x.numel() // C
                k2, k3 = -k1 * invstd * invstd * sum_gxmu / n, -k1 * sum_g / n
            else:
                k2 = k3 = torch.zeros_like(k1)
            gi, gr = k.bn_grad_apply(grad_out, x, out, mean, k1, k2, k3, pre_relu, post_relu, p, key, offset,
                                     need_gi, need_gr)
        gw = (sum_gxmu * invstd).to(wdt) if need_gw else empty.to(wdt)
        gb = sum_g.to(wdt) if need_gb else empty.to(wdt)
        return gi, gw, gb, gr
    return backward


def _forward_fake(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, momentum, eps,
                  pre_relu, post_relu, p, seed):
    acc = _rng.acc_dtype(x.dtype)
    return torch.empty_like(_layout.channel_dense(x)), x.new_empty(x.shape[1], dtype=acc), \
        x.new_empty(x.shape[1], dtype=acc)


def _backward_fake(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask):
    wdt = _grad_dtype(weight, x)
    C = x.shape[1]
    return (torch.empty_like(_layout.channel_dense(x)) if mask[0] else x.new_empty(0),
            x.new_empty(C if mask[1] else 0, dtype=wdt), x.new_empty(C if mask[2] else 0, dtype=wdt),
            torch.empty_like(_layout.channel_dense(x)) if mask[3] else x.new_empty(0))


if _extension.available():
    torch.library.register_fake("fastfuse::batch_norm", _forward_fake)
    torch.library.register_fake("fastfuse::batch_norm_backward", _backward_fake)
    _backends.register("batch_norm", triton=_python_forward("triton"), reference=_python_forward("reference"))
    _backends.register("batch_norm_backward", triton=_python_backward("triton"),
                       reference=_python_backward("reference"))

_ACTS = (None, "relu")


def _check(input, running_mean, running_var, weight, bias, residual, training, momentum, eps, pre_act, post_act,
           num_batches_tracked):
    """Every check runs before anything is computed or modified."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): expected a torch.Tensor input, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"batch_norm(): expected a floating-point input, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm(): expected an input of shape (N, C, *), got {input.dim()}D input")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if t.numel() != C:
            raise RuntimeError(f"batch_norm(): {name} should contain {C} elements (the input's channels, dim 1 of "
                               f"{tuple(input.shape)}), not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(f"batch_norm(): {name} is on {t.device} but the input is on {input.device}")
        if not t.is_floating_point():
            raise TypeError(f"batch_norm(): {name} must be floating point, got {t.dtype}")
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype
                                 or residual.device != input.device):
        raise ValueError(f"batch_norm(): residual must match the input's shape, dtype and device: got "
                         f"{tuple(residual.shape)} {residual.dtype} on {residual.device}, input is "
                         f"{tuple(input.shape)} {input.dtype} on {input.device}")
    if pre_act not in _ACTS or post_act not in _ACTS:
        raise ValueError(f"batch_norm(): pre_act and post_act must be None or 'relu', got {pre_act!r}, {post_act!r}")
    if training:
        if input.numel() // max(C, 1) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        if momentum is None and running_mean is not None and num_batches_tracked is None:
            raise ValueError("batch_norm(): momentum=None (cumulative average) needs num_batches_tracked")
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm(): running_mean and running_var must be given when training=False")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm(): give both running_mean and running_var, or neither")
    if not eps > 0:
        raise ValueError(f"batch_norm(): eps must be positive, got {eps}")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
               pre_act=None, residual=None, post_act=None, dropout_p=0.0, num_batches_tracked=None):
    """dropout(post_act(batch_norm(pre_act(input)) + residual)), each part optional, in fused kernels.

    Same semantics as torch.nn.functional.batch_norm (batch statistics in fp32; running_var updated with the
    unbiased variance), plus: `momentum=None` gives the cumulative average driven by `num_batches_tracked`,
    which is incremented in training, as in the BatchNorm modules. `dropout_p` uses fastfuse.dropout's Philox
    masks over the output's memory order and applies only when `training`."""
    p = _rng.check_p(dropout_p)
    _check(input, running_mean, running_var, weight, bias, residual, training, momentum, eps, pre_act, post_act,
           num_batches_tracked)
    p = p if training else 0.0
    _extension.require()
    seed = torch.ops.fastfuse.seed() if p > 0 else _rng.NO_SEED
    update = training and running_mean is not None
    out, _, _ = torch.ops.fastfuse.batch_norm(
        input, weight, bias, running_mean, running_var, num_batches_tracked if update else None, residual,
        bool(training), None if momentum is None else float(momentum), float(eps), pre_act == "relu",
        post_act == "relu", p, seed)
    return out


def module_bn_args(bn, training):
    """batch_norm's arguments for a BatchNorm module `bn` (or anything with its attributes), by torch's
    _BatchNorm.forward rules: (running_mean, running_var, weight, bias, training, momentum, eps,
    num_batches_tracked). Batch statistics in training or without running stats; the buffers, num_batches_tracked
    included, updated only in training with track_running_stats."""
    running_mean, running_var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    track = getattr(bn, "track_running_stats", True)
    keep = not training or track
    update = training and track
    return (running_mean if keep else None, running_var if keep else None, getattr(bn, "weight", None),
            getattr(bn, "bias", None), training or (running_mean is None and running_var is None),
            getattr(bn, "momentum", 0.1), getattr(bn, "eps", 1e-5),
            getattr(bn, "num_batches_tracked", None) if update else None)


def module_batch_norm(bn, input, training, **fused):
    """batch_norm with torch's _BatchNorm.forward rules for a BatchNorm module `bn` (see module_bn_args).
    `fused` are batch_norm's keyword options."""
    *args, nbt = module_bn_args(bn, training)
    return batch_norm(input, *args, num_batches_tracked=nbt, **fused)
