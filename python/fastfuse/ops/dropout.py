"""fastfuse.dropout: Philox dropout whose mask is regenerated in backward, never stored.

Path of a call: dropout() -> torch.ops.fastfuse.dropout -> _route() -> the backend's kernel;
backward -> torch.ops.fastfuse.dropout_backward -> the same kernel on the gradient (same seed, same mask)."""
import torch

from .. import _backends, _layout, _library, _rng, reference  # noqa: F401  (_library defines the schemas)


def _run_cpp(x, p, key, offset):
    return torch.ops.fastfuse_C.dropout(x, p, key, offset)


def _run_triton(x, p, key, offset):
    from ..triton_kernels import dropout as tk  # imported lazily: triton is optional and slow to import
    return tk.dropout(x, _rng.dropout_threshold(p), _rng.dropout_scale(p), key, offset)


_KERNELS = {"cpp": _run_cpp, "cuda": _run_cpp, "triton": _run_triton, "reference": reference.dropout}


def _route(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    backend = _backends.select(x)
    x = _layout.dense(x)
    if p >= 1:  # x * 0, as torch: NaN and inf stay NaN, negatives give -0
        return torch.mul(x, 0)
    key, offset = _rng.seed_ints(seed)
    return _KERNELS[backend](x, p, key, offset)


def _fake(x, p, seed):
    return torch.empty_like(_layout.dense(x))


for _name in ("fastfuse::dropout", "fastfuse::dropout_backward"):
    torch.library.register_kernel(_name, ("cpu", "cuda"), _route)
    torch.library.register_fake(_name, _fake)


def _setup_context(ctx, inputs, output):
    _, p, seed = inputs
    ctx.p = p
    ctx.out_stride = output.stride()
    ctx.save_for_backward(seed)  # two int64s: the whole state needed to regenerate the mask


def _backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        # the mask lives in the output's storage order, so lay the gradient out the same way first
        grad_input = torch.ops.fastfuse.dropout_backward(_layout.to_strides(grad, ctx.out_stride), ctx.p, seed)
    return grad_input, None, None


# Both ops multiply by the same mask, so each one's backward is dropout_backward (double backward works).
for _name in ("fastfuse::dropout", "fastfuse::dropout_backward"):
    torch.library.register_autograd(_name, _backward, setup_context=_setup_context)


def _eager_cpp(x, p):
    """Eager, a CPU tensor on the cpp backend, p < 1 (p == 1 is x * 0): fastfuse_C::dropout_module, the same kernel,
    seed and mask in one C++ autograd node (csrc/cpu/dropout_autograd.cpp). Through the registered op's generated
    autograd the Python cost ~120 us per forward+backward, which made small layers slower than torch's dropout."""
    return p < 1 and _backends.eager_cpp(x)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Drop-in for torch.nn.functional.dropout: zeroes each element with probability p and scales survivors
    by 1/(1-p). The mask is Philox(seed, i) over the tensor's memory order, the same on every backend and
    device for the same torch.manual_seed; backward regenerates it instead of storing it."""
    p = _rng.check_p(p)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"dropout(): expected a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"dropout(): expected a floating-point tensor, got {input.dtype}")
    if not training or p == 0 or input.numel() == 0:
        return input
    if _eager_cpp(input, p):
        out = torch.ops.fastfuse_C.dropout_module(input, p)  # draws the seed as _rng.new_seed() would
    else:
        out = torch.ops.fastfuse.dropout(input, p, _rng.new_seed())
    # In place keeps torch's semantics (the input holds the result); it does not save memory.
    return input.copy_(out) if inplace else out
