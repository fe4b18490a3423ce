"""Pure-PyTorch reference of every fastfuse op: the test oracle and the "reference" backend.

Philox4x32-10 here uses only int64 tensor ops, so it runs on any device and matches csrc/philox.h and
triton_kernels/philox.py bit for bit."""
import torch

from . import _layout, _rng

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_K0, _K1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and b in [0, 2^32), without int64 overflow."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    t = (p_lo >> 16) + a * (b >> 16)  # a*b = t * 2^16 + (p_lo & 0xffff), t < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Four int64 tensors holding uint32 words; k0, k1 are the two uint32 key words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _K0) & _MASK32, (k1 + _K1) & _MASK32
    return c0, c1, c2, c3


def dropout_words(numel: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """The uint32 word (as int64) of each of `numel` elements: element i is lane i % 4 of group i // 4."""
    g = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    c = philox4x32_10(g & _MASK32, g >> 32, torch.full_like(g, offset & _MASK32),
                      torch.full_like(g, (offset >> 32) & _MASK32), seed & _MASK32, (seed >> 32) & _MASK32)
    return torch.stack(c, dim=1).reshape(-1)[:numel]


def dropout_keep_mask(numel: int, p: float, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Bool keep-mask of the first `numel` elements of stream (seed, offset), in storage order."""
    if p >= 1:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    return dropout_words(numel, seed, offset, device) >= _rng.dropout_threshold(p)


def dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """y = keep ? x * 1/(1-p) : 0 over x's dense storage order, computed in x's accumulation dtype;
    exactly what every fastfuse backend computes."""
    x = _layout.dense(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    if p >= 1:
        return y.zero_()
    acc = _rng.acc_dtype(x.dtype)
    xf = _layout.flat_view(x)
    keep = dropout_keep_mask(x.numel(), p, seed, offset, x.device)
    scaled = (xf.to(acc) * torch.tensor(_rng.dropout_scale(p), dtype=acc, device=x.device)).to(x.dtype)
    _layout.flat_view(y).copy_(torch.where(keep, scaled, torch.zeros((), dtype=x.dtype, device=x.device)))
    return y


# --- embedding_concat_dropout -------------------------------------------------------------------------
# Dropout indexing (every backend uses exactly this): element (b, j) of the (B, D) embedding block, D = sum
# of the tables' widths, is element b * D + j of the Philox stream (seed, offset). The continuous columns
# that follow in the output are never dropped, so they take no part in the stream.

def embedding_concat_keep_mask(batch: int, width: int, p: float, seed: int, offset: int = 0,
                               device=None) -> torch.Tensor:
    """(B, D) bool keep-mask of the embedding block."""
    return dropout_keep_mask(batch * width, p, seed, offset, device).view(batch, width)


def _embedding_dropout_block(block: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """keep ? v * 1/(1-p) : 0 over a (B, D) block, in the accumulation dtype, as the kernels compute it."""
    if p <= 0 or block.numel() == 0:
        return block
    if p >= 1:
        return torch.zeros_like(block)
    acc = _rng.acc_dtype(block.dtype)
    keep = embedding_concat_keep_mask(block.shape[0], block.shape[1], p, seed, offset, block.device)
    scaled = (block.to(acc) * torch.tensor(_rng.dropout_scale(p), dtype=acc, device=block.device)).to(block.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=block.dtype, device=block.device))


def embedding_concat_dropout(x_cat: torch.Tensor, weights, p: float, seed: int, offset: int = 0,
                             cont: torch.Tensor = None) -> torch.Tensor:
    """(B, sum d_t + C): row x_cat[b, t] of every table t in column order, dropout on that block, then
    `cont` (the already batch-normed continuous columns) unchanged. Codes outside [0, n_t) give zeros
    (callers check them before; this keeps the reference as safe as the kernels)."""
    cols = []
    for t, w in enumerate(weights):
        idx = x_cat[:, t].long()
        ok = (idx >= 0) & (idx < w.shape[0])
        rows = w[torch.where(ok, idx, torch.zeros_like(idx))]
        cols.append(torch.where(ok[:, None], rows, torch.zeros((), dtype=w.dtype, device=w.device)))
    dtype = weights[0].dtype if len(weights) else (cont.dtype if cont is not None else torch.float32)
    block = torch.cat(cols, 1) if cols else x_cat.new_empty((x_cat.shape[0], 0), dtype=dtype)
    block = _embedding_dropout_block(block, p, seed, offset)
    return torch.cat([block, cont.to(block.dtype)], 1) if cont is not None else block


def embedding_concat_dropout_backward(grad_output: torch.Tensor, x_cat: torch.Tensor, weights, p: float,
                                      seed: int, offset: int = 0):
    """Gradient of every table: the dropped-out gradient of its columns summed per code, in ascending row
    order per code (a stable sort then segment sums: deterministic on every device, no atomics)."""
    width = sum(w.shape[1] for w in weights)
    g = _embedding_dropout_block(grad_output[:, :width], p, seed, offset)
    grads, col = [], 0
    for t, w in enumerate(weights):
        n, d = w.shape
        gt = g[:, col:col + d]
        col += d
        idx = x_cat[:, t].long()
        ok = (idx >= 0) & (idx < n)
        idx, gt = idx[ok], gt[ok]
        acc = _rng.acc_dtype(w.dtype)
        out = torch.zeros((n, d), dtype=acc, device=w.device)
        if idx.numel():
            idx_sorted, order = torch.sort(idx, stable=True)
            codes, counts = torch.unique_consecutive(idx_sorted, return_counts=True)
            sums = torch.segment_reduce(gt[order].to(acc), "sum", lengths=counts, axis=0)
            out[codes] = sums
        grads.append(out.to(w.dtype))
    return grads
