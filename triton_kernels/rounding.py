"""Float downcasts that give the same bits everywhere. Triton's interpreter truncates fp32 -> bf16 (and its
"rtne" mode does not carry into the exponent), while GPUs and torch round to nearest even; doing the
rounding in integer ops makes the interpreter, the GPU and torch agree bit for bit."""
import triton
import triton.language as tl


@triton.jit
def fp32_to(y, dtype: tl.constexpr):
    """Round float32 y to `dtype` (float32, float16 or bfloat16) to nearest even."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
