"""Philox4x32-10 in Triton, line for line the same as csrc/philox.h (see there for the dropout mapping).

Compile once per dtype and shape class: a kernel takes the seed and offset words and the dropout threshold as
`name: tl.uint32` arguments listed in `do_not_specialize` (RNG_ARGS below). Triton otherwise specialises an int
argument on its value (i32 or i64 by magnitude, divisibility by 16, and 1 as a constexpr), and every call draws a
new seed, so a training loop would compile up to 64 variants of each kernel; a word equal to 1 would also arrive
as a constexpr, on which `.to(tl.uint32)` fails (the threshold is 1 for p in [2^-16, 2^-15))."""
import triton
import triton.language as tl

# The arguments of the kernels that change from call to call: no specialisation on their values.
RNG_ARGS = ("key0", "key1", "off0", "off1", "threshold")

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_K0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_K1: tl.constexpr = tl.constexpr(0xBB67AE85)


def stream_words(seed: int, offset: int):
    """(key0, key1, off0, off1): the uint32 halves of a stream's seed and offset, as the kernels take them."""
    m = 0xFFFFFFFF
    return seed & m, (seed >> 32) & m, offset & m, (offset >> 32) & m


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
def _key_of(r0, r1, r2, r3, lane):
    """16-bit key `lane` (0..7) of a group from its four words: half lane % 2 (low first) of word lane // 2."""
    w = tl.where(lane < 2, r0, tl.where(lane < 4, r1, tl.where(lane < 6, r2, r3)))
    return (w >> ((lane & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def key_tile(g, key0, key1, off0, off1):
    """(len(g), 8) tile of dropout keys (uint32 < 2^16): row j holds the keys of elements 8 g[j] .. 8 g[j] + 7."""
    r0, r1, r2, r3 = dropout_group_words(g, key0, key1, off0, off1)
    return _key_of(r0[:, None], r1[:, None], r2[:, None], r3[:, None], tl.arange(0, 8)[None, :])


@triton.jit
def run_keys(e0, WIDTH: tl.constexpr, key0, key1, off0, off1):
    """(len(e0), WIDTH) tile of the keys of elements e0[:, None] + arange(WIDTH) (e0: int64 run starts, any
    alignment): WIDTH // 8 + 1 Philox calls per run, one per group the run can touch, each selected where its
    group lies. For tiles whose rows are not whole groups (batch norm's channel-innermost reductions)."""
    g0 = e0 >> 3
    e = e0[:, None] + tl.arange(0, WIDTH)[None, :]
    rel = (e >> 3) - g0[:, None]
    lane = (e & 7).to(tl.int32)
    key = tl.zeros((e0.shape[0], WIDTH), tl.uint32)
    for j in tl.static_range(WIDTH // 8 + 1):
        r0, r1, r2, r3 = dropout_group_words(g0 + j, key0, key1, off0, off1)
        key = tl.where(rel == j, _key_of(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane), key)
    return key
