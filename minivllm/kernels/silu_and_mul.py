"""The gated MLP's activation in one pass: silu(gate) * up from the fused gate_up projection."""

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.checks import check_float_inputs, check_rank
from minivllm.kernels.rounding import round_to

BLOCK = 1024


@triton.jit
def _silu_and_mul(X, OUT, width, stride_x, stride_o, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr):
    dtype = OUT.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    # The SiLU is rounded to the model dtype before the product, as F.silu(gate) * up is.
    act = round_to(gate * tl.sigmoid(gate), dtype, INTERPRETER).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, round_to(act * up, dtype, INTERPRETER), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (rows, 2 * width), fp16/bf16/fp32, last dim contiguous, gate columns first. Returns a
    new (rows, width) tensor of silu(gate) * up in x's dtype (reference.silu_and_mul_ref)."""
    check_rank("x", x, 2, "(rows, 2 * width)")
    check_float_inputs(x=x)
    if x.shape[1] % 2:
        raise ValueError(f"x must have an even number of columns (gate then up), got {x.shape[1]}")
    width = x.shape[1] // 2
    out = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    if x.shape[0] and width:
        _silu_and_mul[(x.shape[0], triton.cdiv(width, BLOCK))](
            x, out, width, x.stride(0), out.stride(0), BLOCK=BLOCK, INTERPRETER=interpreting(), num_warps=4,
        )
    return out
