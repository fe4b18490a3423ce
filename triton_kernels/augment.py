"""fastfuse.augment in Triton: one program per (output row, block of BLOCK output columns); it computes the taps
of its pixels once and loops over the channels: gather four taps, blend, lighting, normalise, store.
The coordinates follow csrc/augment.h's arithmetic in the same order (launched with fp fusion off), so they are
the same bits as the C++ kernels'; the lighting uses the device's log and exp (the C++ CPU kernel has its own
vectorisable ones), so lit outputs agree to a few float ulps, not bits."""
import torch
import triton
import triton.language as tl

from .rounding import fp32_to

BLOCK = 128
PAD_CODES = {"zeros": 0, "border": 1, "reflection": 2}


@triton.jit
def _fold(c, n1, PAD: tl.constexpr):
    """csrc/augment.h's augment_fold: reflect (PAD 2) or clamp (PAD 1) into [0, n1]; non-finite -> -1."""
    c = tl.where((c == c) & (c > -3.0e8) & (c < 3.0e8), c, -1.0)
    if PAD == 2:
        span2 = 2.0 * n1
        safe = tl.where(n1 > 0.0, span2, 1.0)
        t = tl.abs(c)
        t = t - tl.floor(t / safe) * safe
        t = tl.where(t > n1, span2 - t, t)
        t = tl.minimum(tl.maximum(t, 0.0), n1)
        c = tl.where(n1 > 0.0, t, 0.0)
    elif PAD == 1:
        c = tl.minimum(tl.maximum(c, 0.0), n1)
    return c


@triton.jit
def _pix_row(m_ptr, i, r0: tl.constexpr, s, dw, dh, bu, bv):
    """Row i of csrc/augment.h's augment_pixel_matrix (r0: its first matrix row, 3 for the w row)."""
    a0 = tl.load(m_ptr + r0 * 3 + 0) + tl.load(m_ptr + 6 + 0) * i
    a1 = tl.load(m_ptr + r0 * 3 + 1) + tl.load(m_ptr + 6 + 1) * i
    a2 = tl.load(m_ptr + r0 * 3 + 2) + tl.load(m_ptr + 6 + 2) * i
    p0 = tl.where(dw > 0.0, (a0 * s) / tl.where(dw > 0.0, dw, 1.0), 0.0)
    p1 = tl.where(dh > 0.0, (a1 * s) / tl.where(dh > 0.0, dh, 1.0), 0.0)
    p2 = s * 0.5 * ((a2 - a0 * bu) - a1 * bv)
    return p0, p1, p2


@triton.jit
def augment_kernel(x_ptr, m_ptr, b_ptr, k_ptr, mean_ptr, std_ptr, y_ptr,
                   C, H, W, h, w, sxb, sxc, sxh, sxw, syb, syc, syh, syw, sw, sh, dw, dh, bu, bv,
                   PAD: tl.constexpr, LIGHT: tl.constexpr, NORM: tl.constexpr, U8: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // h
    oy = row % h
    ox = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = ox < w
    mb = m_ptr + b * 9
    # the rows of (x + w), (y + w) and w: the matrix row plus i times the w row (i = 1, 1, 0), as in C++
    p0, p1, p2 = _pix_row(mb, 1.0, 0, sw, dw, dh, bu, bv)
    p3, p4, p5 = _pix_row(mb, 1.0, 1, sh, dw, dh, bu, bv)
    p6, p7, p8 = _pix_row(mb, 0.0, 2, 2.0, dw, dh, bu, bv)
    fy = oy.to(tl.float32)
    fx = ox.to(tl.float32)
    ax = p1 * fy + p2
    ay = p4 * fy + p5
    aw = p7 * fy + p8
    den = p6 * fx + aw
    cx = _fold((p0 * fx + ax) / den, sw, PAD)
    cy = _fold((p3 * fx + ay) / den, sh, PAD)
    x0f = tl.floor(cx)
    y0f = tl.floor(cy)
    wx0 = (x0f + 1.0) - cx
    wx1 = cx - x0f
    wy0 = (y0f + 1.0) - cy
    wy1 = cy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    vx0 = (x0 >= 0) & (x0 <= W - 1)
    vx1 = (x1 >= 0) & (x1 <= W - 1)
    vy0 = (y0 >= 0) & (y0 <= H - 1)
    vy1 = (y1 >= 0) & (y1 <= H - 1)
    cx0 = tl.minimum(tl.maximum(x0, 0), W - 1).to(tl.int64) * sxw
    cx1 = tl.minimum(tl.maximum(x1, 0), W - 1).to(tl.int64) * sxw
    cy0 = tl.minimum(tl.maximum(y0, 0), H - 1).to(tl.int64) * sxh
    cy1 = tl.minimum(tl.maximum(y1, 0), H - 1).to(tl.int64) * sxh
    w00 = tl.where(vx0 & vy0, wx0 * wy0, 0.0)
    w01 = tl.where(vx1 & vy0, wx1 * wy0, 0.0)
    w10 = tl.where(vx0 & vy1, wx0 * wy1, 0.0)
    w11 = tl.where(vx1 & vy1, wx1 * wy1, 0.0)
    if LIGHT:
        bright = tl.load(b_ptr + b)
        bright = tl.minimum(tl.maximum(bright, 1e-7), 1.0 - 1e-7)
        lb = -tl.log(1.0 / bright - 1.0)
        con = tl.load(k_ptr + b)
    xb = x_ptr + b.to(tl.int64) * sxb
    yb = y_ptr + b.to(tl.int64) * syb + oy.to(tl.int64) * syh + ox.to(tl.int64) * syw
    for c in range(C):
        xc = xb + c * sxc
        v00 = tl.load(xc + cy0 + cx0, mask=inside, other=0).to(tl.float32)
        v01 = tl.load(xc + cy0 + cx1, mask=inside, other=0).to(tl.float32)
        v10 = tl.load(xc + cy1 + cx0, mask=inside, other=0).to(tl.float32)
        v11 = tl.load(xc + cy1 + cx1, mask=inside, other=0).to(tl.float32)
        v = ((w00 * v00 + w01 * v01) + w10 * v10) + w11 * v11
        if U8:
            v = v / 255.0
        if LIGHT:
            v = tl.minimum(tl.maximum(v, 1e-7), 1.0 - 1e-7)
            v = 1.0 / (1.0 + tl.exp(-(con * (tl.log(v / (1.0 - v)) + lb))))
        if NORM:
            v = (v - tl.load(mean_ptr + c)) / tl.load(std_ptr + c)
        tl.store(yb + c * syc, fp32_to(v, y_ptr.dtype.element_ty), mask=inside)


def augment(x, matrix, size, brightness, contrast, mean, std, pad_mode, out_dtype, channels_last):
    """The op's arguments (checked by fastfuse.augment); x in any strides, float32 matrix/lighting/normalisation
    tensors on x's device."""
    B, C, H, W = x.shape
    h, w = size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((B, C, h, w), dtype=out_dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    m = f32(matrix)
    light, norm = brightness is not None, mean is not None
    bt, kt, mt, st = f32(brightness), f32(contrast), f32(mean), f32(std)
    dummy = m  # unused pointer arguments
    grid = (B * h, triton.cdiv(w, BLOCK))
    augment_kernel[grid](x, m, bt if light else dummy, kt if light else dummy, mt if norm else dummy,
                         st if norm else dummy, y, C, H, W, h, w, *x.stride(), *y.stride(),
                         float(W - 1), float(H - 1), float(max(w - 1, 0)), float(max(h - 1, 0)), float(w > 1),
                         float(h > 1),
                         PAD=PAD_CODES[pad_mode], LIGHT=light, NORM=norm, U8=x.dtype == torch.uint8, BLOCK=BLOCK,
                         enable_fp_fusion=False)
    return y
