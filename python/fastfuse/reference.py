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


def dropout_keys(numel: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """The 16-bit dropout key (as int64) of each of `numel` elements: element i is lane i % 8 of group
    i // 8, the (i % 2)-th 16-bit half (low first) of Philox word (i % 8) // 2 (see csrc/philox.h)."""
    g = torch.arange((numel + 7) // 8, dtype=torch.int64, device=device)
    c = philox4x32_10(g & _MASK32, g >> 32, torch.full_like(g, offset & _MASK32),
                      torch.full_like(g, (offset >> 32) & _MASK32), seed & _MASK32, (seed >> 32) & _MASK32)
    words = torch.stack(c, dim=1)  # (groups, 4)
    return torch.stack([words & 0xFFFF, words >> 16], dim=2).reshape(-1)[:numel]


def dropout_keep_mask(numel: int, p: float, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Bool keep-mask of the first `numel` elements of stream (seed, offset), in storage order."""
    if p >= 1:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    return dropout_keys(numel, seed, offset, device) >= _rng.dropout_threshold(p)


def _mask_factor(keep, scale, dtype):
    """keep ? scale : 0 as `dtype`: values are multiplied by it, as torch multiplies by its dropout mask, so
    a dropped NaN or inf gives NaN and a dropped negative value -0."""
    return torch.where(keep, torch.tensor(scale, dtype=dtype, device=keep.device),
                       torch.zeros((), dtype=dtype, device=keep.device))


def dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """y = x * (keep ? 1/(1-p) : 0) over x's dense storage order, computed in x's accumulation dtype;
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
    _layout.flat_view(y).copy_((xf.to(acc) * _mask_factor(keep, _rng.dropout_scale(p), acc)).to(x.dtype))
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
        return block * 0  # as torch: NaN stays NaN, negatives give -0
    acc = _rng.acc_dtype(block.dtype)
    keep = embedding_concat_keep_mask(block.shape[0], block.shape[1], p, seed, offset, block.device)
    return (block.to(acc) * _mask_factor(keep, _rng.dropout_scale(p), acc)).to(block.dtype)


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
    return embedding_table_grads(_embedding_dropout_block(grad_output[:, :width], p, seed, offset), x_cat, weights)


def embedding_table_grads(g: torch.Tensor, x_cat: torch.Tensor, weights):
    """Every table's gradient from the (already dropped-out) (B, D) gradient of the embedding block."""
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
# ---- batch norm: the four primitives every backend implements (see fastfuse/ops/batch_norm.py) ----
# x is (N, C, *) and dense; "x'" is relu(x) when pre_relu. Statistics and arithmetic are in the accumulation
# dtype; the output keeps x's strides and dtype. The dropout mask is over x's storage order, as in dropout().

def _channel_dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _like(x, value):
    """value (any layout) cast to x's dtype and laid out with x's strides."""
    return torch.empty_like(x).copy_(value)


def _keep_like(x, p, seed, offset):
    """Bool keep-mask with x's shape and strides: element i of x's storage gets key i of the stream."""
    keep = torch.empty_like(x, dtype=torch.bool)
    _layout.flat_view(keep).copy_(dropout_keep_mask(x.numel(), p, seed, offset, x.device))
    return keep


def _pre(x, pre_relu):
    xa = x.to(_rng.acc_dtype(x.dtype))
    return xa.clamp_min(0) if pre_relu else xa


def bn_stats(x, pre_relu):
    """Per-channel (mean, biased variance) of x', two-pass for stability."""
    xa = _pre(x, pre_relu)
    mean = xa.mean(_channel_dims(x))
    var = (xa - _per_channel(mean, x)).square().mean(_channel_dims(x))
    return mean, var


def bn_apply(x, mean, scale, bias, residual, pre_relu, post_relu, p, seed, offset):
    """y = drop(post((x' - mean) * scale + bias + residual))."""
    z = (_pre(x, pre_relu) - _per_channel(mean, x)) * _per_channel(scale, x) + _per_channel(bias, x)
    if residual is not None:
        z = z + residual.to(z.dtype)
    if post_relu:
        z = z.clamp_min(0)
    if p > 0:
        z = z * _mask_factor(_keep_like(x, p, seed, offset), _rng.dropout_scale(p), z.dtype)
    return _like(x, z)


def _bn_grad(grad_out, x, out, post_relu, p, seed, offset):
    """g = dL/d(bn output + residual): grad_out through dropout and the post-ReLU (whose mask is out > 0)."""
    g = grad_out.to(_rng.acc_dtype(x.dtype))
    if p > 0:
        g = g * _rng.dropout_scale(p)
    if post_relu:
        return torch.where(out > 0, g, torch.zeros((), dtype=g.dtype))  # out > 0 also means "kept"
    if p > 0:
        return g * _mask_factor(_keep_like(x, p, seed, offset), 1.0, g.dtype)
    return g


def bn_grad_reduce(grad_out, x, out, mean, pre_relu, post_relu, p, seed, offset):
    """Per-channel (sum g, sum g * (x' - mean))."""
    g = _bn_grad(grad_out, x, out, post_relu, p, seed, offset)
    dims = _channel_dims(x)
    return g.sum(dims), (g * (_pre(x, pre_relu) - _per_channel(mean, x))).sum(dims)


def bn_grad_apply(grad_out, x, out, mean, k1, k2, k3, pre_relu, post_relu, p, seed, offset, need_gi, need_g):
    """(grad_input, g): grad_input = relu'(x) * (k1 * g + k2 * (x' - mean) + k3); g as in bn_grad_reduce.
    Either is an empty tensor when not needed."""
    g = _bn_grad(grad_out, x, out, post_relu, p, seed, offset)
    gi = g.new_empty(0)
    if need_gi:
        gi = _per_channel(k1, x) * g + _per_channel(k2, x) * (_pre(x, pre_relu) - _per_channel(mean, x)) \
            + _per_channel(k3, x)
        if pre_relu:
            gi = torch.where(x > 0, gi, torch.zeros((), dtype=gi.dtype))
        gi = _like(x, gi)
    return gi, (_like(x, g) if need_g else x.new_empty(0))
def reflect_conv2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """conv2d of the reflection-padded input: F.pad(mode="reflect") then an unpadded convolution. This is
    exactly what nn.Conv2d(padding_mode="reflect") computes (and it does build the padded copy)."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    x = torch.nn.functional.pad(input, (pw, pw, ph, ph), mode="reflect") if ph or pw else input
    return torch.nn.functional.conv2d(x, weight, bias, stride, 0, dilation, groups)


def reflect_conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    """(grad_input, grad_weight, grad_bias) of reflect_conv2d through aten's own backward ops: the padded
    input's gradient, folded back by reflection_pad2d_backward. Entries not in output_mask are None."""
    ph, pw = padding
    pad = [pw, pw, ph, ph]
    xp = torch.nn.functional.pad(input, pad, mode="reflect") if ph or pw else input
    gxp, gw, gb = torch.ops.aten.convolution_backward(
        grad_output, xp, weight, [weight.shape[0]], list(stride), [0, 0], list(dilation), False, [0, 0], groups,
        [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2])])
    gx = None
    if output_mask[0]:
        gx = torch.ops.aten.reflection_pad2d_backward(gxp, input, pad) if ph or pw else gxp
    return gx, gw, gb


# ---- augment ------------------------------------------------------------------------------------------
def augment_lighting(v, brightness, contrast):
    """fastai's lighting (Brightness then Contrast in logit space): sigmoid(contrast * (logit(v) + logit(b))),
    with fastai's logit (clamped to [1e-7, 1 - 1e-7]); brightness and contrast per image."""
    def logit(t):
        t = t.clamp(1e-7, 1 - 1e-7)
        return -(1 / t - 1).log()
    b = brightness.to(v.dtype).view(-1, 1, 1, 1)
    c = contrast.to(v.dtype).view(-1, 1, 1, 1)
    return torch.sigmoid(c * (logit(v) + logit(b)))


def augment(x, matrix, size, brightness=None, contrast=None, mean=None, std=None, pad_mode="reflection",
            out_dtype=torch.float32, channels_last=False):
    """fastai's composition: uint8 -> x/255, the identity grid (F.affine_grid), its perspective warp by
    `matrix` ((B, 3, 3): [x, y, w] = matrix @ [u, v, 1], source (x/w, y/w)), F.grid_sample (bilinear,
    align_corners=True, `pad_mode`), lighting in logit space, then (y - mean) / std per channel."""
    import warnings

    import torch.nn.functional as F
    h, w = size
    xf = x.float() / 255 if x.dtype == torch.uint8 else x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    B = x.shape[0]
    eye = torch.eye(3, dtype=xf.dtype, device=x.device)[:2].expand(B, 2, 3)
    with warnings.catch_warnings():  # a size-1 side: affine_grid puts its pixel at 0, and says so
        warnings.simplefilter("ignore", UserWarning)
        grid = F.affine_grid(eye, [B, x.shape[1], h, w], align_corners=True)  # (B, h, w, 2): (u, v)
    uv1 = torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1).view(B, -1, 3)
    xyw = uv1 @ matrix.to(xf.dtype).transpose(1, 2)
    coords = (xyw[..., :2] / xyw[..., 2:]).view(B, h, w, 2)
    y = F.grid_sample(xf, coords, mode="bilinear", padding_mode=pad_mode, align_corners=True)
    if brightness is not None:
        y = augment_lighting(y, brightness, contrast)
    if mean is not None:
        y = (y - mean.to(y.dtype).view(1, -1, 1, 1)) / std.to(y.dtype).view(1, -1, 1, 1)
    y = y.to(out_dtype)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
