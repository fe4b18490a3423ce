"""Reflection-padded conv2d in Triton: implicit GEMMs with tl.dot whose loads map every padded coordinate
through the reflection, so no padded tensor is built. fp32 accumulation; strided loads and stores, so
contiguous and channels_last tensors both work. Each output element (or wgrad partial sum) is written by one
program that loops over its whole reduction range: no atomics, the same bits on every run.

  forward: M = output pixels (n, oh, ow), N = output channels of a group, K = (cg, kh, kw)
  dgrad:   M = input pixels (n, ih, iw),   N = input channels of a group,  K = (oc, kh, kw), summed over
           the up to 3 x 3 padded positions that reflect onto each input pixel (itself and its mirrors)
  wgrad:   M = output channels, N = (cg, kh, kw), K = output pixels (n, oh, ow), split in a fixed number
           of ranges whose fp32 partial sums are added in order afterwards"""
import torch
import triton
import triton.language as tl

from .rounding import fp32_to


@triton.jit
def _reflect(i, size):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= size, 2 * (size - 1) - i, i)


@triton.jit
def _mma(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter's bf16 tl.dot gives garbage: do it in fp32 there
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:
        return acc + tl.dot(a, b, input_precision="ieee")
    return acc + tl.dot(a, b)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, C_g, H, W, OC_g, OH, OW,
                sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
                SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n_idx, oh, ow = m // (OH * OW), m // OW % OH, m % OW
    m_ok = m < N * OH * OW
    oc = pid_n * BN + tl.arange(0, BN)
    oc_ok = oc < OC_g
    K = C_g * KH * KW
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        cg, kh, kw = k // (KH * KW), k // KW % KH, k % KW
        k_ok = k < K
        ih = _reflect(oh[:, None] * SH - PH + kh[None, :] * DH, H)
        iw = _reflect(ow[:, None] * SW - PW + kw[None, :] * DW, W)
        a = tl.load(x_ptr + n_idx[:, None].to(tl.int64) * sxn + (g * C_g + cg[None, :]) * sxc + ih * sxh + iw * sxw,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (g * OC_g + oc[None, :]) * swo + cg[:, None] * swc + kh[:, None] * swh + kw[:, None] * sww,
                    mask=k_ok[:, None] & oc_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * OC_g + oc, mask=oc_ok, other=0.0).to(tl.float32)[None, :]
    y_off = n_idx[:, None].to(tl.int64) * syn + (g * OC_g + oc[None, :]) * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y_ptr + y_off, fp32_to(acc, y_ptr.dtype.element_ty), mask=m_ok[:, None] & oc_ok[None, :])


@triton.jit
def _mirror(i, size, P: tl.constexpr, which: tl.constexpr):
    """Padded coordinate of mirror `which` of source coordinate i (0: itself, 1: before the start, 2: after
    the end) and whether that padded position exists."""
    if which == 0:
        return i, i >= 0
    elif which == 1:
        return -i, (i >= 1) & (i <= P)
    else:
        return 2 * (size - 1) - i, (i >= size - 1 - P) & (i <= size - 2)


@triton.jit
def _dgrad_kernel(go_ptr, w_ptr, gi_ptr, N, C_g, H, W, OC_g, OH, OW,
                  sgn, sgc, sgh, sgw, swo, swc, swh, sww, sin, sic, sih, siw,
                  SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                  DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n_idx, ih, iw = m // (H * W), m // W % H, m % W
    m_ok = m < N * H * W
    c = pid_n * BN + tl.arange(0, BN)
    c_ok = c < C_g
    K = OC_g * KH * KW
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for mh in tl.static_range(3):
        for mw in tl.static_range(3):
            ph_, vh = _mirror(ih, H, PH, mh)
            pw_, vw = _mirror(iw, W, PW, mw)
            valid = m_ok & vh & vw
            if tl.max(valid.to(tl.int32), axis=0) > 0:  # most blocks have no border pixel: skip mirrors
                for k0 in range(0, K, BK):
                    k = k0 + tl.arange(0, BK)
                    oc, kh, kw = k // (KH * KW), k // KW % KH, k % KW
                    k_ok = k < K
                    th = ph_[:, None] + PH - kh[None, :] * DH
                    tw = pw_[:, None] + PW - kw[None, :] * DW
                    th = tl.where(th >= 0, th, 0) + tl.where(th >= 0, 0, -SH * OH)  # negative -> out of range
                    tw = tl.where(tw >= 0, tw, 0) + tl.where(tw >= 0, 0, -SW * OW)
                    oh, ow = th // SH, tw // SW
                    ok = (valid[:, None] & k_ok[None, :] & (th % SH == 0) & (tw % SW == 0) & (oh >= 0) & (oh < OH)
                          & (ow >= 0) & (ow < OW))
                    a = tl.load(go_ptr + n_idx[:, None].to(tl.int64) * sgn + (g * OC_g + oc[None, :]) * sgc
                                + oh * sgh + ow * sgw, mask=ok, other=0.0)
                    b = tl.load(w_ptr + (g * OC_g + oc[:, None]) * swo + c[None, :] * swc + kh[:, None] * swh
                                + kw[:, None] * sww, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
                    acc = _mma(acc, a, b, IEEE, UPCAST)
    off = n_idx[:, None].to(tl.int64) * sin + (g * C_g + c[None, :]) * sic + ih[:, None] * sih + iw[:, None] * siw
    tl.store(gi_ptr + off, fp32_to(acc, gi_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _wgrad_kernel(go_ptr, x_ptr, part_ptr, N, C_g, H, W, OC_g, OH, OW, SPLITS, P_PER,
                  sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                  SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                  DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g, split = pid_gs // SPLITS, pid_gs % SPLITS
    oc = pid_m * BM + tl.arange(0, BM)
    oc_ok = oc < OC_g
    j = pid_n * BN + tl.arange(0, BN)
    cg, kh, kw = j // (KH * KW), j // KW % KH, j % KW
    j_ok = j < C_g * KH * KW
    P = N * OH * OW
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for p0 in range(split * P_PER, tl.minimum(P, (split + 1) * P_PER), BK):
        p = p0 + tl.arange(0, BK)
        n_idx, oh, ow = p // (OH * OW), p // OW % OH, p % OW
        p_ok = p < P
        a = tl.load(go_ptr + n_idx[None, :].to(tl.int64) * sgn + (g * OC_g + oc[:, None]) * sgc + oh[None, :] * sgh
                    + ow[None, :] * sgw, mask=oc_ok[:, None] & p_ok[None, :], other=0.0)
        ih = _reflect(oh[:, None] * SH - PH + kh[None, :] * DH, H)
        iw = _reflect(ow[:, None] * SW - PW + kw[None, :] * DW, W)
        b = tl.load(x_ptr + n_idx[:, None].to(tl.int64) * sxn + (g * C_g + cg[None, :]) * sxc + ih * sxh + iw * sxw,
                    mask=p_ok[:, None] & j_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, IEEE, UPCAST)
    # fp32 partial sums [split, OC, C_g*KH*KW]; the launcher adds the splits in a fixed order (no atomics)
    K = C_g * KH * KW
    off = (split.to(tl.int64) * (OC_g * tl.num_programs(2) // SPLITS) + g * OC_g + oc[:, None]) * K + j[None, :]
    tl.store(part_ptr + off, acc, mask=oc_ok[:, None] & j_ok[None, :])


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _blocks(t):
    # the interpreter runs one program at a time on the CPU: small tiles keep tiny test shapes cheap
    return (32, 16, 16) if t.device.type == "cpu" else (64, 64, 32)


def _check(x):
    if x.dtype not in _DTYPES:
        raise TypeError(f"fastfuse triton reflect_conv2d supports float16, bfloat16 and float32, got {x.dtype}")


def _geom(x, w, stride, padding, dilation, groups):
    N, C, H, W = x.shape
    OC, C_g, KH, KW = w.shape
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    consts = dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1], KH=KH,
                  KW=KW, IEEE=x.dtype == torch.float32, UPCAST=x.dtype == torch.bfloat16 and x.device.type == "cpu")
    return N, C_g, H, W, OC // groups, OH, OW, consts


def reflect_conv2d(x, w, b, stride, padding, dilation, groups):
    _check(x)
    N, C_g, H, W, OC_g, OH, OW, consts = _geom(x, w, stride, padding, dilation, groups)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    y = torch.empty((N, w.shape[0], OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    BM, BN, BK = _blocks(x)
    grid = (triton.cdiv(N * OH * OW, BM), triton.cdiv(OC_g, BN), groups)
    _fwd_kernel[grid](x, w, b if b is not None else w, y, N, C_g, H, W, OC_g, OH, OW, *x.stride(), *w.stride(),
                      *y.stride(), HAS_BIAS=b is not None, BM=BM, BN=BN, BK=BK, **consts)
    return y


def reflect_conv2d_backward(go, x, w, stride, padding, dilation, groups, mask):
    """(grad_input, grad_weight, grad_bias); entries not in mask are None. grad_bias is torch's fp32 sum."""
    _check(x)
    N, C_g, H, W, OC_g, OH, OW, consts = _geom(x, w, stride, padding, dilation, groups)
    BM, BN, BK = _blocks(x)
    gi = gw = gb = None
    if mask[0]:
        gi = torch.empty_like(x)
        if gi.numel():
            grid = (triton.cdiv(N * H * W, BM), triton.cdiv(C_g, BN), groups)
            if go.numel():
                _dgrad_kernel[grid](go, w, gi, N, C_g, H, W, OC_g, OH, OW, *go.stride(), *w.stride(), *gi.stride(),
                                    BM=BM, BN=BN, BK=BK, **consts)
            else:
                gi.zero_()
    if mask[1]:
        # split the N*OH*OW reduction so that enough programs run (a fixed split count: same bits every run)
        K = C_g * w.shape[2] * w.shape[3]
        P = N * OH * OW
        tiles = triton.cdiv(OC_g, BM) * triton.cdiv(K, BN) * groups
        splits = max(1, min(triton.cdiv(P, 4 * BK), triton.cdiv(512, tiles)))
        if x.device.type == "cpu":  # the interpreter: keep it cheap, but still go through the split path
            splits = min(2, triton.cdiv(P, BK))
        p_per = triton.cdiv(triton.cdiv(P, splits), BK) * BK
        part = torch.zeros((splits, w.shape[0], K), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(OC_g, BM), triton.cdiv(K, BN), groups * splits)
        _wgrad_kernel[grid](go, x, part, N, C_g, H, W, OC_g, OH, OW, splits, p_per, *go.stride(), *x.stride(),
                            BM=BM, BN=BN, BK=BK, **consts)
        gw = part.sum(0).view(w.shape).to(w.dtype)  # the router lays it out like the weight
    if mask[2]:
        gb = go.sum((0, 2, 3), dtype=torch.float32).to(go.dtype)
    return gi, gw, gb
