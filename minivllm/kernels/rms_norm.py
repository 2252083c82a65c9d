"""RMSNorm over rows, fused with the residual add before it: one read and one write per tensor
instead of the eight elementwise passes the PyTorch form launches."""

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.checks import check_float_inputs, check_rank, check_same_shape
from minivllm.kernels.rounding import round_to


@triton.jit
def _rms_norm(
    X, RES, W, OUT, RES_OUT, dim, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr,
):
    dtype = OUT.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(RES + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the model dtype, as the unfused `x + residual` is.
        x = round_to(x.to(tl.float32) + res.to(tl.float32), dtype, INTERPRETER)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / dim + eps)
    # Rounded to the model dtype before the weight, the checkpoint's convention.
    normed = round_to(xf * rstd, dtype, INTERPRETER).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, round_to(normed * w, dtype, INTERPRETER), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Row-wise RMSNorm, the contract of reference.rms_norm_ref.

    x: (rows, dim), fp16/bf16/fp32, last dim contiguous; weight: (dim,), same dtype; eps > 0.
    With `residual` (rows, dim, same dtype), the rows normalised are x + residual (rounded to the
    dtype) and the result is (normalised, x + residual), both new tensors; else the normalised
    rows alone. Statistics are fp32.
    """
    check_rank("x", x, 2, "(rows, dim)")
    check_rank("weight", weight, 1, "(dim,)")
    tensors = dict(x=x, weight=weight) if residual is None else dict(x=x, weight=weight, residual=residual)
    check_float_inputs(**tensors)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (dim,) = ({x.shape[1]},) to match x's rows, got {tuple(weight.shape)}")
    if residual is not None:
        check_same_shape("x", x, "residual", residual)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        res = residual if residual is not None else x
        _rms_norm[(x.shape[0],)](
            X=x, RES=res, W=weight, OUT=out, RES_OUT=res_out, dim=x.shape[1], eps=eps,
            stride_x=x.stride(0), stride_r=res.stride(0), stride_o=out.stride(0), stride_ro=res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, INTERPRETER=interpreting(),
            num_warps=max(1, min(8, block // 256)),
        )
    return out if residual is None else (out, res_out)
