"""Batch norm in Triton: the four primitives of fastfuse.reference.bn_* (stats, fused apply, gradient sums,
fused gradient), for fp16/bf16/fp32 inputs with fp32 math.

Layouts, as in csrc/batch_norm.h: a dense (N, C, *) tensor is walked in storage order either as planes
(contiguous: element i has channel (i // S) % C) or as rows (channel innermost: channel i % C).
Reductions write per-partition partial sums whose split depends only on the shape; torch adds them up in
float64 in a fixed order, so the result is deterministic.

Dropout keys come one Philox call per 8 elements, as in csrc/philox.h: the elementwise kernels and the planes
reduction walk (groups, 8) tiles of the storage order (key_tile); the rows reduction, whose tile rows are runs of
channels that need not start on a group, takes the groups each run touches (run_keys). The seed words and the
threshold are uint32 arguments that Triton does not specialise on (philox.RNG_ARGS)."""
import torch
import triton
import triton.language as tl

from fastfuse import _rng

from .philox import RNG_ARGS, key_tile, run_keys, stream_words
from .rounding import fp32_to

BLOCK_GROUPS = 128  # elementwise: 1024 elements per program
BLOCK_PLANE = 128  # planes reduction: groups of 8 per step
BLOCK_R, BLOCK_C = 32, 32  # rows reduction tile
MASK_NONE, MASK_POST, MASK_DROP = 0, 1, 2  # how the gradient is masked (see reference._bn_grad)


def _geometry(x):
    C = x.shape[1]
    if x.is_contiguous():
        S = x.numel() // (x.shape[0] * C) if x.numel() else 1
        return C, S, S == 1
    return C, 1, True


def _check(x):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fastfuse triton batch_norm supports float16, bfloat16 and float32, got {x.dtype}")


@triton.jit
def _relu(v):
    return tl.where(v < 0, 0.0, v)  # NaN stays NaN


@triton.jit
def _grad(go_ptr, out_ptr, offs, mask, ds, key, threshold, MASK_KIND: tl.constexpr):
    """g = dL/d(bn + residual) at offs (fp32): grad_out through dropout (key: the dropout keys of offs, read
    only with MASK_DROP) and the post-ReLU."""
    g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32) * ds
    if MASK_KIND == 1:
        out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(out > 0, g, 0.0)
    elif MASK_KIND == 2:
        g = g * tl.where(key >= threshold.to(tl.uint32), 1.0, 0.0)  # NaN * 0 = NaN, as torch
    return g


@triton.jit
def _u32(key0, key1, off0, off1):
    return key0.to(tl.uint32), key1.to(tl.uint32), off0.to(tl.uint32), off1.to(tl.uint32)


@triton.jit
def _pair(x_ptr, go_ptr, out_ptr, ref, offs, mask, ds, key, threshold, PRE: tl.constexpr,
          GRAD: tl.constexpr, MASK_KIND: tl.constexpr):
    """The two summands of element offs: (x' - ref, (x' - ref)^2) for stats (ref = a shift inside the
    channel), (g, g (x' - ref)) for gradients (ref = mean)."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRE:
        v = _relu(v)
    d = tl.where(mask, v - ref, 0.0)
    if GRAD:
        g = _grad(go_ptr, out_ptr, offs, mask, ds, key, threshold, MASK_KIND)
        return g, g * d
    return d, d * d


@triton.jit(do_not_specialize=RNG_ARGS)
def _reduce_planes_kernel(x_ptr, go_ptr, out_ptr, ref_ptr, part_ptr, C, S, A, a_per_part, ds, threshold: tl.uint32,
                          key0: tl.uint32, key1: tl.uint32, off0: tl.uint32, off1: tl.uint32, PRE: tl.constexpr,
                          GRAD: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """Each (channel, partition) program walks its planes as (BLOCK_GROUPS, 8) tiles of whole Philox groups,
    masked to the plane [base, base + S)."""
    c = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    ref = tl.load(ref_ptr + c)
    lanes = tl.arange(0, 8)[None, :]
    s1 = tl.zeros((BLOCK_GROUPS, 8), tl.float32)
    s2 = tl.zeros((BLOCK_GROUPS, 8), tl.float32)
    for a in range(part * a_per_part, tl.minimum(A, (part + 1) * a_per_part)):
        base = (a * C + c) * S
        for g0 in range(base >> 3, ((base + S - 1) >> 3) + 1, BLOCK_GROUPS):
            g = g0 + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
            offs = g[:, None] * 8 + lanes
            key = threshold
            if MASK_KIND == 2:
                key = key_tile(g, *_u32(key0, key1, off0, off1))
            u, q = _pair(x_ptr, go_ptr, out_ptr, ref, offs, (offs >= base) & (offs < base + S), ds, key, threshold,
                         PRE, GRAD, MASK_KIND)
            s1 += u
            s2 += q
    tl.store(part_ptr + (part * C + c) * 2, tl.sum(tl.sum(s1, 1), 0))
    tl.store(part_ptr + (part * C + c) * 2 + 1, tl.sum(tl.sum(s2, 1), 0))


@triton.jit(do_not_specialize=RNG_ARGS)
def _reduce_rows_kernel(x_ptr, go_ptr, out_ptr, ref_ptr, part_ptr, C, R, r_per_part, ds, threshold: tl.uint32,
                        key0: tl.uint32, key1: tl.uint32, off0: tl.uint32, off1: tl.uint32, PRE: tl.constexpr,
                        GRAD: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    part = tl.program_id(1).to(tl.int64)
    cmask = c < C
    ref = tl.load(ref_ptr + c, mask=cmask, other=0.0)[None, :]
    s1 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    r_end = tl.minimum(R, (part + 1) * r_per_part)
    for r0 in range(part * r_per_part, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & cmask[None, :]
        key = threshold
        if MASK_KIND == 2:
            key = run_keys(r.to(tl.int64) * C + tl.program_id(0).to(tl.int64) * BLOCK_C, BLOCK_C,
                           *_u32(key0, key1, off0, off1))
        u, q = _pair(x_ptr, go_ptr, out_ptr, ref, r[:, None] * C + c[None, :], mask, ds, key, threshold,
                     PRE, GRAD, MASK_KIND)
        s1 += u
        s2 += q
    tl.store(part_ptr + (part * C + c) * 2, tl.sum(s1, 0), mask=cmask)
    tl.store(part_ptr + (part * C + c) * 2 + 1, tl.sum(s2, 0), mask=cmask)


def _channel_sums(x, ref, grad_out=None, out=None, pre_relu=False, mask_kind=MASK_NONE, p=0.0, seed=0, offset=0):
    """Per-channel float64 sums of the two summands of _pair."""
    C, S, rows = _geometry(x)
    threshold, ds = _rng.drop_args(p)  # the keys are compared only with MASK_DROP
    grad = grad_out is not None
    go = grad_out if grad else x
    outp = out if out is not None else x
    ref = ref.to(torch.float32).contiguous()
    if rows:
        R = x.numel() // C
        parts = min(triton.cdiv(R, 4 * BLOCK_R), 256)
        per = triton.cdiv(triton.cdiv(R, parts), BLOCK_R) * BLOCK_R
        parts = triton.cdiv(R, per)
        partial = torch.empty(parts, C, 2, dtype=torch.float32, device=x.device)
        _reduce_rows_kernel[(triton.cdiv(C, BLOCK_C), parts)](
            x, go, outp, ref, partial, C, R, per, ds, threshold, *stream_words(seed, offset), PRE=pre_relu, GRAD=grad,
            MASK_KIND=mask_kind, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    else:
        A = x.numel() // (C * S)
        parts = min(A, 32)
        per = triton.cdiv(A, parts)
        parts = triton.cdiv(A, per)
        partial = torch.empty(parts, C, 2, dtype=torch.float32, device=x.device)
        _reduce_planes_kernel[(C, parts)](
            x, go, outp, ref, partial, C, S, A, per, ds, threshold, *stream_words(seed, offset), PRE=pre_relu,
            GRAD=grad, MASK_KIND=mask_kind, BLOCK_GROUPS=BLOCK_PLANE)
    total = partial.double().sum(0)
    return total[:, 0], total[:, 1]


def bn_stats(x, pre_relu):
    _check(x)
    first = x[(0, slice(None)) + (0,) * (x.dim() - 2)].float()  # each channel's first element: the shift
    shift = first.clamp_min(0) if pre_relu else first
    s1, s2 = _channel_sums(x, shift, pre_relu=pre_relu)
    n = x.numel() // x.shape[1]
    m = s1 / n
    return (shift.double() + m).float(), (s2 / n - m * m).clamp_min(0).float()


def _mask_kind(post_relu, p):
    return MASK_POST if post_relu else MASK_DROP if p > 0 else MASK_NONE


def bn_grad_reduce(grad_out, x, out, mean, pre_relu, post_relu, p, seed, offset):
    _check(x)
    s1, s2 = _channel_sums(x, mean, grad_out, out, pre_relu, _mask_kind(post_relu, p), p, seed, offset)
    return s1.float(), s2.float()


@triton.jit(do_not_specialize=RNG_ARGS)
def _apply_kernel(x_ptr, res_ptr, y_ptr, mean_ptr, scale_ptr, bias_ptr, n, C, S, threshold: tl.uint32, ds,
                  key0: tl.uint32, key1: tl.uint32, off0: tl.uint32, off1: tl.uint32, ROWS: tl.constexpr, PRE: tl.constexpr, POST: tl.constexpr, HAS_RES: tl.constexpr,
                  DROP: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    offs = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    mask = offs < n
    c = offs % C if ROWS else (offs // S) % C
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRE:
        v = _relu(v)
    z = (v - tl.load(mean_ptr + c, mask=mask)) * tl.load(scale_ptr + c, mask=mask) + tl.load(bias_ptr + c, mask=mask)
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if POST:
        z = _relu(z)
    if DROP:
        key = key_tile(g, *_u32(key0, key1, off0, off1))
        z = z * tl.where(key >= threshold.to(tl.uint32), ds, 0.0)
    tl.store(y_ptr + offs, fp32_to(z, y_ptr.dtype.element_ty), mask=mask)


def bn_apply(x, mean, scale, bias, residual, pre_relu, post_relu, p, seed, offset):
    _check(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    C, S, rows = _geometry(x)
    drop = p > 0
    _apply_kernel[(triton.cdiv(n, 8 * BLOCK_GROUPS),)](
        x, residual if residual is not None else x, y, mean.float().contiguous(), scale.float().contiguous(),
        bias.float().contiguous(), n, C, S, *_rng.drop_args(p), *stream_words(seed, offset), ROWS=rows,
        PRE=pre_relu, POST=post_relu, HAS_RES=residual is not None, DROP=drop, BLOCK_GROUPS=BLOCK_GROUPS)
    return y


@triton.jit(do_not_specialize=RNG_ARGS)
def _grad_apply_kernel(go_ptr, x_ptr, out_ptr, gi_ptr, g_ptr, mean_ptr, k1_ptr, k2_ptr, k3_ptr, n, C, S,
                       threshold: tl.uint32, ds, key0: tl.uint32, key1: tl.uint32, off0: tl.uint32, off1: tl.uint32,
                       ROWS: tl.constexpr, PRE: tl.constexpr, MASK_KIND: tl.constexpr, NEED_GI: tl.constexpr,
                       NEED_G: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    grp = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    offs = grp[:, None] * 8 + tl.arange(0, 8)[None, :]
    mask = offs < n
    key = threshold
    if MASK_KIND == 2:
        key = key_tile(grp, *_u32(key0, key1, off0, off1))
    g = _grad(go_ptr, out_ptr, offs, mask, ds, key, threshold, MASK_KIND)
    if NEED_G:
        tl.store(g_ptr + offs, fp32_to(g, g_ptr.dtype.element_ty), mask=mask)
    if NEED_GI:
        c = offs % C if ROWS else (offs // S) % C
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xp = _relu(v) if PRE else v
        xc = xp - tl.load(mean_ptr + c, mask=mask)
        r = tl.load(k1_ptr + c, mask=mask) * g + tl.load(k2_ptr + c, mask=mask) * xc + tl.load(k3_ptr + c, mask=mask)
        if PRE:
            r = tl.where(v > 0, r, 0.0)
        tl.store(gi_ptr + offs, fp32_to(r, gi_ptr.dtype.element_ty), mask=mask)


def bn_grad_apply(grad_out, x, out, mean, k1, k2, k3, pre_relu, post_relu, p, seed, offset, need_gi, need_g):
    _check(x)
    gi = torch.empty_like(x) if need_gi else x.new_empty(0)
    g = torch.empty_like(x) if need_g else x.new_empty(0)
    n = x.numel()
    if n == 0 or not (need_gi or need_g):
        return gi, g
    C, S, rows = _geometry(x)
    kind = _mask_kind(post_relu, p)
    f = lambda t: t.float().contiguous()  # noqa: E731
    _grad_apply_kernel[(triton.cdiv(n, 8 * BLOCK_GROUPS),)](
        grad_out, x, out if out is not None else x, gi if need_gi else x, g if need_g else x, f(mean), f(k1), f(k2),
        f(k3), n, C, S, *_rng.drop_args(p), *stream_words(seed, offset), ROWS=rows, PRE=pre_relu,
        MASK_KIND=kind, NEED_GI=need_gi, NEED_G=need_g, BLOCK_GROUPS=BLOCK_GROUPS)
    return gi, g
