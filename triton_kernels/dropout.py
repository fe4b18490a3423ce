"""Fused dropout in Triton: each program draws dropout keys for BLOCK_GROUPS groups of 8 elements and
applies keep ? x * scale : 0 to the matching (BLOCK_GROUPS, 8) tile of the dense input."""
import torch
import triton
import triton.language as tl

from .philox import RNG_ARGS, key_tile, stream_words
from .rounding import fp32_to

BLOCK_GROUPS = 128


@triton.jit(do_not_specialize=RNG_ARGS)
def dropout_kernel(x_ptr, y_ptr, n_elements, threshold: tl.uint32, scale, key0: tl.uint32, key1: tl.uint32,
                   off0: tl.uint32, off1: tl.uint32, BLOCK_GROUPS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    key = key_tile(g, key0.to(tl.uint32), key1.to(tl.uint32), off0.to(tl.uint32), off1.to(tl.uint32))
    offs = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    y = x.to(tl.float32) * tl.where(key >= threshold.to(tl.uint32), scale, 0.0)  # NaN * 0 = NaN, as torch
    tl.store(y_ptr + offs, fp32_to(y, y_ptr.dtype.element_ty), mask=mask)


def dropout(x: torch.Tensor, threshold: int, scale: float, seed: int, offset: int) -> torch.Tensor:
    """x must be dense; threshold and scale come from fastfuse._rng. fp16/bf16/fp32 (fp32 math)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fastfuse triton dropout supports float16, bfloat16 and float32, got {x.dtype}")
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    grid = (triton.cdiv(n, 8 * BLOCK_GROUPS),)
    dropout_kernel[grid](x, y, n, threshold, scale, *stream_words(seed, offset),
                         BLOCK_GROUPS=BLOCK_GROUPS, num_warps=4)
    return y
