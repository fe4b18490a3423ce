"""fastfuse.reflect_conv2d: conv2d over the reflection-padded input, without building the padded copy.

A call: reflect_conv2d() calls fastfuse::reflect_conv2d, whose autograd (csrc/reflect_conv2d.cpp) and kernels
(csrc/cpu/reflect_conv2d_kernel.cpp, csrc/cuda/reflect_conv2d_kernel.cu) are C++; the kernels check every argument
first, with torch's error messages. This file holds the fake kernels and the Python backends (reference; "triton" runs the reference too: the Triton
kernel is retired)."""
import torch

from .. import _backends, _extension, reference

# The CPU designs (csrc/cpu/reflect_conv2d_cpu.h) by name, as FASTFUSE_REFLECT_CONV2D_ALGO takes them and as the
# helper ops torch.ops.fastfuse_C.reflect_conv2d(..., algo) take their codes (tests, benchmarks): "auto" picks per
# shape and direction; "frame" = vendor convolution with zero padding + frame correction (every device, dtype and
# layout); "direct" (CPU, AVX-512, fp32, one group; NCHW through a relayout) = our own micro-kernel on every pixel
# with folded taps; where it cannot run, "auto" runs. On CUDA every value runs "frame".
_ALGOS = {"auto": 0, "frame": 1, "direct": 2}


def _pair(v, name):
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise RuntimeError(f"reflect_conv2d: expected {name} to be a single integer value or a list of 2 values, "
                           f"got {v}")
    return [int(v[0]), int(v[1])]


def _check(x, w, b, stride, padding, dilation, groups):
    """Raise what F.conv2d / F.pad(mode='reflect') would raise: the fake's checks, which torch.compile runs while
    tracing (and meta tensors, which reach the fake); the C++ kernels check the same (csrc/reflect_conv2d.h)."""
    if x.dim() != 4:
        raise RuntimeError(f"reflect_conv2d: expected a 4-D input (batched), got {x.dim()}-D input of size "
                           f"{list(x.shape)}")
    if w.dim() != 4:
        raise RuntimeError(f"weight should have 4 dimensions, got {w.dim()}-D weight of size {list(w.shape)}")
    for t, name in ((w, "weight"), (b, "bias")):
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"Input type ({x.device}) and {name} type ({t.device}) should be the same")
        if t.dtype != x.dtype:
            raise RuntimeError(f"Input type ({x.dtype}) and {name} type ({t.dtype}) should be the same")
    if not x.is_floating_point():
        raise RuntimeError(f"reflect_conv2d: expected a floating-point input, got {x.dtype}")
    if any(s <= 0 for s in stride):
        raise RuntimeError("non-positive stride is not supported")
    if any(p < 0 for p in padding):
        raise RuntimeError("negative padding is not supported")
    if any(d <= 0 for d in dilation):
        raise RuntimeError("dilation should be greater than zero")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if w.shape[0] % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
                           f"but got weight of size {list(w.shape)} instead")
    if x.shape[1] != w.shape[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(w.shape)}, expected input{list(x.shape)} "
                           f"to have {w.shape[1] * groups} channels, but got {x.shape[1]} channels instead")
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0]):
        raise RuntimeError(f"Given weight of size {list(w.shape)}, expected bias to be 1-dimensional with "
                           f"{w.shape[0]} elements, but got bias of size {list(b.shape)} instead")
    # torch checks the width (argument #4 of the pad) before the height (argument #6)
    for dim, arg, p in ((3, 4, padding[1]), (2, 6, padding[0])):
        if p >= x.shape[dim]:
            raise RuntimeError(f"Argument #{arg}: Padding size should be less than the corresponding input "
                               f"dimension, but got: padding ({p}, {p}) at dimension {dim} of input {list(x.shape)}")
    eff = [d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:])]
    padded = [x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]]
    if padded[0] < eff[0] or padded[1] < eff[1]:
        raise RuntimeError(f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
                           f"({eff[0]} x {eff[1]}). Kernel size can't be greater than actual input size")


def _out_shape(x, w, stride, padding, dilation):
    return [x.shape[0], w.shape[0]] + [
        (x.shape[i + 2] + 2 * padding[i] - dilation[i] * (w.shape[i + 2] - 1) - 1) // stride[i] + 1 for i in (0, 1)]


def _channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _format(x, w):
    """The output layout torch's convolution picks: channels_last when the input or the weight is."""
    return torch.channels_last if _channels_last(x) or _channels_last(w) else torch.contiguous_format


def _python_forward(run):
    """The op on a Python backend (the C++ kernel checked the arguments), with the C++ kernels' output layout."""
    def forward(x, w, b, stride, padding, dilation, groups):
        return run(x, w, b, stride, padding, dilation, groups).contiguous(memory_format=_format(x, w))
    return forward


def _python_backward(run):
    def backward(go, x, w, stride, padding, dilation, groups, mask):
        gi, gw, gb = run(go, x, w, stride, padding, dilation, groups, list(mask))
        empty = x.new_empty(0)
        return (gi.contiguous(memory_format=_format(x, w)) if mask[0] else empty,
                gw.contiguous(memory_format=_weight_format(w)) if mask[1] else empty.clone(),
                gb.contiguous() if mask[2] else empty.clone())
    return backward


def _weight_format(w):
    return torch.channels_last if _channels_last(w) else torch.contiguous_format


def _fake(x, w, b, stride, padding, dilation, groups):
    _check(x, w, b, stride, padding, dilation, groups)
    return x.new_empty(_out_shape(x, w, stride, padding, dilation)).contiguous(memory_format=_format(x, w))


def _fake_backward(go, x, w, stride, padding, dilation, groups, mask):
    empty = x.new_empty(0)
    return (torch.empty_like(x, memory_format=_format(x, w)) if mask[0] else empty,
            torch.empty_like(w, memory_format=_weight_format(w)) if mask[1] else empty.clone(),
            w.new_empty(w.shape[0]) if mask[2] else empty.clone())


if _extension.available():
    torch.library.register_fake("fastfuse::reflect_conv2d", _fake)
    torch.library.register_fake("fastfuse::reflect_conv2d_backward", _fake_backward)
    # No Triton kernel (retired, docs/reflect_conv2d.md: an implicit GEMM through the reflection cannot beat
    # cuDNN's conv; the CUDA design is cuDNN plus a frame correction). Under the "triton" override this op runs
    # torch's own path, F.pad + conv2d (cuDNN on CUDA), so a model under that override still runs.
    _backends.register("reflect_conv2d", triton=_python_forward(reference.reflect_conv2d),
                       reference=_python_forward(reference.reflect_conv2d))
    _backends.register("reflect_conv2d_backward", triton=_python_backward(reference.reflect_conv2d_backward),
                       reference=_python_backward(reference.reflect_conv2d_backward))


def _autocast(x, w, b):
    """Under torch.autocast, torch's conv2d runs in the autocast dtype (bfloat16 on CPU, float16 on CUDA by
    default): cast the floating-point arguments as autocast would cast conv2d's, so the drop-in gives the same
    dtype and speed."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, w, b
    dtype = torch.get_autocast_dtype(x.device.type)
    eligible = lambda t: isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64  # noqa
    cast = lambda t: t.to(dtype) if eligible(t) else t  # noqa: E731  (autocast leaves float64 alone too)
    return cast(x), cast(w), cast(b)


def reflect_conv2d(input: torch.Tensor, weight: torch.Tensor, bias=None, stride=1, padding=0, dilation=1,
                   groups: int = 1) -> torch.Tensor:
    """Same result as F.conv2d(F.pad(input, (pw, pw, ph, ph), mode='reflect'), weight, bias, stride, 0,
    dilation, groups), with int or pair arguments, batched (N, C, H, W) or unbatched (C, H, W) input. The
    reflected index is computed where the input is read: no padded tensor is built. Deterministic backward."""
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    unbatched = isinstance(input, torch.Tensor) and input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    x, weight, bias = _autocast(x, weight, bias)  # the op checks the arguments (csrc/reflect_conv2d.h)
    _extension.require()
    out = torch.ops.fastfuse.reflect_conv2d(x, weight, bias, stride, padding, dilation, int(groups))
    return out.squeeze(0) if unbatched else out
