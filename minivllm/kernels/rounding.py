"""Rounding fp32 values to a storage dtype the same way on the GPU and in the interpreter."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """x (fp32) rounded to nearest-even in `dtype`. Triton's interpreter truncates fp32 -> bf16,
    which doubles the error of every intermediate rounding the fused kernels copy from the
    unfused model; there the mantissa is rounded first, so the truncating cast is exact."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
