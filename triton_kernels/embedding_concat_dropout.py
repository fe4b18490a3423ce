"""embedding_concat_dropout in Triton. Forward: each program takes BLOCK_GROUPS Philox groups (8 elements
each) of the (B, D) embedding block, gathers their table rows and applies the mask, writing straight into
the (B, D + C) output. Backward: the same tiling regenerates the mask on the gradient; the per-table sums
then use fastfuse.reference.embedding_table_grads (a stable sort and segment sums: deterministic, no atomics).

The tables are read in place through a device array of their addresses: no per-call copy of the tables, and no
host-to-device copy per call. That array and the per-column metadata (table and column of each output column, rows
and width of each table) are a pure function of the tables' addresses, shapes and dtype, so they are built once and
cached on the device under that key (the key holds no tensor: a freed table keeps nothing alive, and a new table at
the same address with the same shape needs the very same metadata)."""
import torch
import triton
import triton.language as tl

from .philox import RNG_ARGS, key_tile, stream_words
from .rounding import fp32_to

BLOCK_GROUPS = 64


@triton.jit
def _keys(g, key0, key1, off0, off1):
    return key_tile(g, key0.to(tl.uint32), key1.to(tl.uint32), off0.to(tl.uint32), off1.to(tl.uint32))


@triton.jit(do_not_specialize=RNG_ARGS)
def ecd_forward_kernel(x_ptr, addr_ptr, col_t_ptr, col_k_ptr, dim_ptr, rows_ptr, out_ptr,
                       n_elements, D, T, W, threshold: tl.uint32, scale, key0: tl.uint32, key1: tl.uint32,
                       off0: tl.uint32, off1: tl.uint32, BLOCK_GROUPS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    key = _keys(g, key0, key1, off0, off1)
    e = g[:, None] * 8 + tl.arange(0, 8)[None, :]  # element b*D + j of the embedding block
    live = e < n_elements
    b = e // D
    j = e - b * D
    t = tl.load(col_t_ptr + j, mask=live, other=0)
    k = tl.load(col_k_ptr + j, mask=live, other=0).to(tl.int64)
    idx = tl.load(x_ptr + b * T + t, mask=live, other=0)
    n = tl.load(rows_ptr + t, mask=live, other=1)
    ok = live & (idx >= 0) & (idx < n)  # a bad code reads nothing and gives 0
    d = tl.load(dim_ptr + t, mask=live, other=0)
    table = tl.load(addr_ptr + t, mask=live, other=0).to(tl.pointer_type(out_ptr.dtype.element_ty))
    v = tl.load(table + idx * d + k, mask=ok, other=0.0)
    y = v.to(tl.float32) * tl.where(key >= threshold.to(tl.uint32), scale, 0.0)  # NaN * 0 = NaN, as torch
    tl.store(out_ptr + b * W + j, fp32_to(y, out_ptr.dtype.element_ty), mask=live)


@triton.jit(do_not_specialize=RNG_ARGS)
def ecd_grad_mask_kernel(g_ptr, out_ptr, n_elements, D, W, threshold: tl.uint32, scale, key0: tl.uint32,
                         key1: tl.uint32, off0: tl.uint32, off1: tl.uint32, BLOCK_GROUPS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    key = _keys(g, key0, key1, off0, off1)
    e = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    live = e < n_elements
    b = e // D
    j = e - b * D
    v = tl.load(g_ptr + b * W + j, mask=live, other=0.0)
    y = v.to(tl.float32) * tl.where(key >= threshold.to(tl.uint32), scale, 0.0)
    tl.store(out_ptr + e, fp32_to(y, out_ptr.dtype.element_ty), mask=live)


def _check_dtype(dtype):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fastfuse triton embedding_concat_dropout supports float16, bfloat16 and float32, "
                        f"got {dtype}")


def _mask_args(p, key, offset):
    from fastfuse import _rng
    return (*_rng.drop_args(p), *stream_words(key, offset))


_META = {}  # (device, dtype, ((address, rows, width) per table)) -> metadata on the device
_META_MAX = 64  # distinct table sets kept; a model has one (two with an EMA copy)


def _layout(weights, device):
    """(addresses, col_t, col_k, dims, rows) on the device, and D: built on the first call for these tables (the
    only host-to-device copy), then read from the cache."""
    key = (str(device), weights[0].dtype, tuple((w.data_ptr(), w.shape[0], w.shape[1]) for w in weights))
    hit = _META.get(key)
    if hit is None:
        dims = [w.shape[1] for w in weights]
        col_t = torch.repeat_interleave(torch.arange(len(weights), dtype=torch.int32), torch.tensor(dims))
        col_k = torch.cat([torch.arange(d, dtype=torch.int32) for d in dims])
        meta = [torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64), col_t, col_k,
                torch.tensor(dims, dtype=torch.int64), torch.tensor([w.shape[0] for w in weights], dtype=torch.int64)]
        if len(_META) >= _META_MAX:
            _META.clear()
        hit = _META[key] = ([m.to(device) for m in meta], sum(dims))
    return hit


def forward(x_cat, weights, p, key, offset, cont):
    """x_cat: contiguous int64 (B, T); weights: contiguous tables of one dtype; cont: (B, C) or None."""
    _check_dtype(weights[0].dtype)
    (addr, col_t, col_k, dims, rows), D = _layout(weights, x_cat.device)
    B, T = x_cat.shape
    C = cont.shape[1] if cont is not None else 0
    out = torch.empty((B, D + C), dtype=weights[0].dtype, device=x_cat.device)
    if C:
        out[:, D:].copy_(cont)
    n = B * D
    if n:
        grid = (triton.cdiv(n, 8 * BLOCK_GROUPS),)
        ecd_forward_kernel[grid](x_cat, addr, col_t, col_k, dims, rows, out, n, D, T, D + C,
                                 *_mask_args(p, key, offset), BLOCK_GROUPS=BLOCK_GROUPS, num_warps=4)
    return out


def backward(grad, x_cat, weights, p, key, offset):
    from fastfuse import reference
    _check_dtype(weights[0].dtype)
    D = sum(w.shape[1] for w in weights)
    B = x_cat.shape[0]
    masked = torch.empty((B, D), dtype=grad.dtype, device=grad.device)
    n = B * D
    if n:
        grid = (triton.cdiv(n, 8 * BLOCK_GROUPS),)
        ecd_grad_mask_kernel[grid](grad, masked, n, D, grad.shape[1], *_mask_args(p, key, offset),
                                   BLOCK_GROUPS=BLOCK_GROUPS, num_warps=4)
    return reference.embedding_table_grads(masked, x_cat, weights)
