"""fastfuse.dropout: Philox dropout whose mask is regenerated in backward, never stored.

A call: dropout() checks its arguments, draws a seed (fastfuse::seed) and calls fastfuse::dropout, whose autograd
(csrc/dropout.cpp) and kernels (csrc/cpu/dropout_kernel.cpp, csrc/cuda/dropout_kernel.cu) are C++. This file holds
the fake kernels and the Python backends (triton, reference)."""
import torch

from .. import _backends, _extension, _layout, _rng, reference


def _python_backend(run):
    """One of the Python backends of both ops (they multiply by the same mask): layout and p == 1 as in C++."""
    def op(x, p, seed):
        x = _layout.dense(x)
        if p >= 1:  # x * 0, as torch: NaN and inf stay NaN, negatives give -0
            return torch.mul(x, 0)
        return run(x, p, *_rng.seed_ints(seed))
    return op


def _triton(x, p, key, offset):
    from ..triton_kernels import dropout as tk  # imported lazily: triton is optional and slow to import
    return tk.dropout(x, _rng.dropout_threshold(p), _rng.dropout_scale(p), key, offset)


def _fake(x, p, seed):
    return torch.empty_like(_layout.dense(x))


if _extension.available():
    for _name in ("dropout", "dropout_backward"):
        torch.library.register_fake(f"fastfuse::{_name}", _fake)
        _backends.register(_name, triton=_python_backend(_triton), reference=_python_backend(reference.dropout))


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
    _extension.require()
    out = torch.ops.fastfuse.dropout(input, p, torch.ops.fastfuse.seed())
    # In place keeps torch's semantics (the input holds the result); it does not save memory.
    return input.copy_(out) if inplace else out
