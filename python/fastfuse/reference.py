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
