"""fastfuse.batch_norm: dropout(post_act(bn(pre_act(x)) + residual)) in two passes forward, two backward.

Every backend implements four primitives with the signatures of fastfuse.reference.bn_* (per-channel stats;
the fused elementwise forward; the per-channel gradient sums; the fused elementwise backward). This file
does the O(C) per-channel arithmetic between them in torch, for the triton, cuda and reference backends.
The cpp backend repeats it in C++, for speed: csrc/cpu/batch_norm_composite.cpp runs the same ATen ops in one
call (from Python they cost more than the kernels at small shapes), and for contiguous (N, C, *) tensors in
training bn_train_planes(_backward) reduce and apply one channel at a time while it is in cache (memory is read
once instead of twice; csrc/cpu/batch_norm_impl.h). Tests hold all of them to torch and to each other."""
import types

import torch

# _library defines the schemas
from .. import _backends, _double_backward, _layout, _library, _rng, reference  # noqa: F401


def _cuda(name):
    return lambda *args: getattr(torch.ops.fastfuse_C, name)(*args)


# the CUDA kernels of fastfuse_C (cpp never comes here: _forward/_backward send it to its C++ entry points)
_CUDA = types.SimpleNamespace(**{n: _cuda(n) for n in ("bn_stats", "bn_apply", "bn_grad_reduce", "bn_grad_apply")})


def _kernels(backend):
    if backend == "cuda":
        return _CUDA
    if backend == "triton":
        from ..triton_kernels import batch_norm as tk  # lazily: triton is optional and slow to import
        return tk
    return reference


def _one_read(x):
    """The cpp backend's one-read training kernels (bn_train_planes*) take non-empty contiguous (N, C, *) tensors
    with planes of more than one element: they reduce and apply a channel while it is still in cache."""
    return x.dim() > 2 and x.is_contiguous() and x.numel() > x.shape[0] * x.shape[1]  # (x[0, 0], a view: ~10 us)


def _train_planes(x, weight, bias, residual, eps, pre_relu, post_relu, p, seed):
    acc, C = _rng.acc_dtype(x.dtype), x.shape[1]
    if residual is not None:
        residual = _layout.to_strides(residual, x.stride())
    return torch.ops.fastfuse_C.bn_train_planes(x, _acc_vec(weight, acc, C, 1.0, x), _acc_vec(bias, acc, C, 0.0, x),
                                                residual, eps, pre_relu, post_relu, p, *_rng.seed_ints(seed))


def _train_planes_backward(grad_out, x, weight, mean, var, out, eps, pre_relu, post_relu, p, seed, mask):
    acc, C = _rng.acc_dtype(x.dtype), x.shape[1]
    _, need_gw, need_gb, need_gr = mask
    out = _layout.to_strides(out, x.stride()) if out is not None else None
    gi, gr, sum_g, sum_gxmu = torch.ops.fastfuse_C.bn_train_planes_backward(
        _layout.to_strides(grad_out, x.stride()), x, out, _acc_vec(weight, acc, C, 1.0, x), mean, var, eps,
        pre_relu, post_relu, p, *_rng.seed_ints(seed), need_gr)
    wdt = _grad_dtype(weight, x)
    gw = (sum_gxmu * torch.rsqrt(var + eps)).to(wdt) if need_gw else x.new_empty(0, dtype=wdt)
    gb = sum_g.to(wdt) if need_gb else x.new_empty(0, dtype=wdt)
    return gi, gw, gb, gr


def _acc_vec(t, acc, C, fill, like):
    return t.to(acc) if t is not None else torch.full((C,), fill, dtype=acc, device=like.device)


def _forward(x, weight, bias, running_mean, running_var, residual, training, eps, pre_relu, post_relu, p, seed):
    backend = _backends.select(x)
    if backend == "cpp":
        if training and p < 1 and _one_read(x):
            return _train_planes(x, weight, bias, residual, eps, pre_relu, post_relu, p, seed)
        # all of the below in one C++ call (csrc/cpu/batch_norm_composite.cpp)
        return torch.ops.fastfuse_C.bn_forward(x, weight, bias, running_mean, running_var, residual, training, eps,
                                               pre_relu, post_relu, p, *_rng.seed_ints(seed))
    k = _kernels(backend)
    x = _layout.channel_dense(x)
    acc, C = _rng.acc_dtype(x.dtype), x.shape[1]
    if training:
        mean, var = k.bn_stats(x, pre_relu)
    else:  # copies: an op's outputs must not alias its inputs
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    if x.numel() == 0 or p >= 1:
        return torch.zeros_like(x), mean, var
    scale = torch.rsqrt(var + eps) * _acc_vec(weight, acc, C, 1.0, x)
    if residual is not None:
        residual = _layout.to_strides(residual, x.stride())
    key, offset = _rng.seed_ints(seed)
    out = k.bn_apply(x, mean, scale, _acc_vec(bias, acc, C, 0.0, x), residual, pre_relu, post_relu, p, key, offset)
    return out, mean, var


def _forward_fake(x, weight, bias, running_mean, running_var, residual, training, eps, pre_relu, post_relu, p, seed):
    acc = _rng.acc_dtype(x.dtype)
    return torch.empty_like(_layout.channel_dense(x)), x.new_empty(x.shape[1], dtype=acc), \
        x.new_empty(x.shape[1], dtype=acc)


def _grad_dtype(weight, x):
    return weight.dtype if weight is not None else _rng.acc_dtype(x.dtype)


def _backward(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask):
    backend = _backends.select(x)
    if backend == "cpp":
        if training and mask[0] and p < 1 and _one_read(x):
            return _train_planes_backward(grad_out, x, weight, mean, var, out, eps, pre_relu, post_relu, p, seed,
                                          mask)
        # all of the below in one C++ call (csrc/cpu/batch_norm_composite.cpp)
        return torch.ops.fastfuse_C.bn_backward(grad_out, x, weight, mean, var, out, training, eps, pre_relu,
                                                post_relu, p, *_rng.seed_ints(seed), *mask)
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
    key, offset = _rng.seed_ints(seed)
    invstd = torch.rsqrt(var + eps)
    sum_g = sum_gxmu = None
    gi = gr = empty
    if need_gw or need_gb or (training and need_gi):
        sum_g, sum_gxmu = k.bn_grad_reduce(grad_out, x, out, mean, pre_relu, post_relu, p, key, offset)
    if need_gi or need_gr:
        k1 = invstd * _acc_vec(weight, acc, C, 1.0, x)
        if training and need_gi:  # d/dx of the batch statistics: grad_x = k1 * (g - mean(g) - xhat * mean(g * xhat))
            n = x.numel() // C
            k2, k3 = -k1 * invstd * invstd * sum_gxmu / n, -k1 * sum_g / n
        else:
            k2 = k3 = torch.zeros_like(k1)
        gi, gr = k.bn_grad_apply(grad_out, x, out, mean, k1, k2, k3, pre_relu, post_relu, p, key, offset,
                                 need_gi, need_gr)
    gw = (sum_gxmu * invstd).to(wdt) if need_gw else empty.to(wdt)
    gb = sum_g.to(wdt) if need_gb else empty.to(wdt)
    return gi, gw, gb, gr


def _backward_fake(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask):
    wdt = _grad_dtype(weight, x)
    C = x.shape[1]
    return (torch.empty_like(_layout.channel_dense(x)) if mask[0] else x.new_empty(0),
            x.new_empty(C if mask[1] else 0, dtype=wdt), x.new_empty(C if mask[2] else 0, dtype=wdt),
            torch.empty_like(_layout.channel_dense(x)) if mask[3] else x.new_empty(0))


torch.library.register_kernel("fastfuse::batch_norm", ("cpu", "cuda"), _forward)
torch.library.register_fake("fastfuse::batch_norm", _forward_fake)
torch.library.register_kernel("fastfuse::batch_norm_backward", ("cpu", "cuda"), _backward)
torch.library.register_fake("fastfuse::batch_norm_backward", _backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, _, training, eps, pre_relu, post_relu, p, seed = inputs
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.args = (training, eps, pre_relu, post_relu, p)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # the post-ReLU's mask is out > 0; without a post-ReLU the output is not needed
    ctx.save_for_backward(x, weight, mean, var, out if post_relu else None, seed)


def _reference_grads(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask):
    """Gradients for create_graph=True (see _double_backward): the forward again in torch ops from the saved
    tensors. The bias and the residual only shift the output, so zeros stand in for them (their gradients do not
    depend on their values); the post-ReLU and dropout masks are the forward's (its output, its seed)."""
    acc, dims = _rng.acc_dtype(x.dtype), [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xd = _layout.channel_dense(x)  # the dropout mask follows its memory order, as in the forward
    factor = reference._bn_grad(torch.ones_like(xd, dtype=acc), xd, out, post_relu, p, *_rng.seed_ints(seed))

    def forward(x, weight, bias, residual):
        xa = x.to(acc).clamp_min(0) if pre_relu else x.to(acc)
        mu, sigma2 = (xa.mean(dims), xa.var(dims, correction=0)) if training else (mean, var)
        z = (xa - mu.view(shape)) * torch.rsqrt(sigma2 + eps).view(shape)
        z = z * weight.to(acc).view(shape) if weight is not None else z
        z = z + bias.view(shape) if bias is not None else z
        return ((z + residual if residual is not None else z) * factor).to(x.dtype)

    stand_in = [x.new_zeros(x.shape[1], dtype=acc) if mask[2] else None, torch.zeros_like(x, dtype=acc) if mask[3]
                else None]
    return _double_backward.grads(forward, [x, weight, *stand_in], grad_out, mask)


def _autograd_backward(ctx, grad_out, _grad_mean, _grad_var, backward_op=None):
    x, weight, mean, var, out, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[5]]
    if grad_out is None or not any(mask):
        return (None,) * 12
    if _double_backward.wanted() and x.numel() > 0 and ctx.args[4] < 1:  # (else the output was constant)
        gi, gw, gb, gr = _reference_grads(grad_out, x, weight, mean, var, out, *ctx.args, seed, mask)
    else:
        backward_op = backward_op or torch.ops.fastfuse.batch_norm_backward
        gi, gw, gb, gr = backward_op(grad_out, x, weight, mean, var, out, *ctx.args, seed, mask)
    pick = lambda t, m: t if m else None  # noqa: E731
    gb = gb.to(ctx.bias_dtype) if mask[2] else None
    return pick(gi, mask[0]), pick(gw, mask[1]), gb, None, None, pick(gr, mask[3]), *(None,) * 6


torch.library.register_autograd("fastfuse::batch_norm", _autograd_backward, setup_context=_setup_context)


class _EagerBatchNorm(torch.autograd.Function):
    """The same kernels, forward and backward, without torch.library's per-call Python dispatch (about 0.3 ms
    per call here, as much as the kernels themselves at (512, 1000)). Used in eager mode only: under
    torch.compile / export the registered op runs, so tracing sees one custom op."""

    @staticmethod
    def forward(ctx, *args):  # old-style (ctx first): new-style apply() inspects the signature on every call
        ctx.set_materialize_grads(False)  # mean/var get no gradient: no zero tensors made for them
        output = _forward(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        return _autograd_backward(ctx, grad_out, grad_mean, grad_var, backward_op=_backward)


def _batch_norm_op(*args):
    if torch.compiler.is_compiling() or type(args[0]) is not torch.Tensor:
        return torch.ops.fastfuse.batch_norm(*args)
    return _EagerBatchNorm.apply(*args)

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
    seed = _rng.new_seed() if p > 0 else _rng.NO_SEED
    out, mean, var = _batch_norm_op(input, weight, bias, running_mean, running_var, residual,
                                                   bool(training), float(eps), pre_act == "relu",
                                                   post_act == "relu", p, seed)
    if training and running_mean is not None:
        with torch.no_grad():
            factor = momentum
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if momentum is None:
                    factor = 1.0 / num_batches_tracked.to(mean.dtype)
            n = input.numel() // input.shape[1]
            if running_mean.dtype == mean.dtype:  # one op each (the common case: fp32 stats)
                running_mean.lerp_(mean, factor)
                running_var.lerp_(var * (n / (n - 1)), factor)
            else:
                running_mean.copy_(mean * factor + running_mean.to(mean.dtype) * (1 - factor))
                running_var.copy_(var * (n / (n - 1)) * factor + running_var.to(var.dtype) * (1 - factor))
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
