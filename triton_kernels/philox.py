"""Philox4x32-10 in Triton, line for line the same as csrc/philox.h (see there for the dropout mapping)."""
import triton
import triton.language as tl

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_K0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_K1: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """c0..c3: uint32 tensors (counter words); k0, k1: uint32 key words."""
    m0 = tl.cast(PHILOX_M0, tl.uint32)
    m1 = tl.cast(PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + tl.cast(PHILOX_K0, tl.uint32)
        k1 = k1 + tl.cast(PHILOX_K1, tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def dropout_group_words(g, key0, key1, off0, off1):
    """The four words of dropout groups g (int64 tensor); key/off are the uint32 halves of seed and offset."""
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    zero = c0 * 0
    return philox4x32_10(c0, c1, zero + off0, zero + off1, key0, key1)


@triton.jit
def word_tile(g, key0, key1, off0, off1):
    """(len(g), 4) tile of words: row j holds the words of elements 4 g[j] .. 4 g[j] + 3."""
    r0, r1, r2, r3 = dropout_group_words(g, key0, key1, off0, off1)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, r0[:, None], tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))


@triton.jit
def element_words(offs, key0, key1, off0, off1):
    """The word of each element index in offs (any shape, int64): lane offs % 4 of group offs // 4.
    Costs a Philox call per element; word_tile shares one call between 4 aligned elements."""
    r0, r1, r2, r3 = dropout_group_words(offs >> 2, key0, key1, off0, off1)
    lane = offs & 3
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
