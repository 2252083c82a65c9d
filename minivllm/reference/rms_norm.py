"""RMSNorm as Qwen3 checkpoints were trained with it, optionally after a residual add."""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: (rows, dim); weight: (dim,); both in the model dtype.

    Normalises each row in fp32 (fp64 for fp64 input), rounds to x's dtype, then multiplies by the weight in that
    dtype. With `residual` (same shape and dtype as x) the row normalised is x + residual,
    rounded to the dtype, and the function returns (normalised, x + residual); without it,
    the normalised rows alone.
    """
    if residual is not None:
        x = x + residual
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)
