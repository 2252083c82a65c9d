"""A linear layer for a few rows (decode at small batches), with the step before it fused in.

At one to sixteen rows a projection is a read of its weight: (N, K) bf16 values against a few
hundred FLOPs per value. cuBLAS's kernels for such shapes tile N 64 wide (`nvjet ... 64x8` on an
H100), so a Qwen3-0.6B projection of N = 1024..6144 runs 16 to 96 programs on 132 SMs and reads
its weight at about 1.4 TB/s (benchmarks/NOTES.md). Here each program owns BLOCK_N output columns
for every row and streams their weight rows along K, so a narrow BLOCK_N fills the SMs, and the
work that feeds the projection rides along instead of launching a kernel of its own:

- `residual` and `norm_weight`: the residual add and RMSNorm before the qkv and gate_up
  projections. The norm is one scale per row, so it is applied to the products at the end:
  y = (W @ ((x + residual) * norm_weight)) / rms(x + residual); the residual sum is rounded as the
  unfused add rounds it (program 0 writes it), the rest within reference.rms_norm_ref's error.
- `gated`: silu(gate) * up before the down projection, x then holding gate and up side by side.

Products accumulate in fp32. One row multiplies and sums on the CUDA cores; more rows pad to a
16-row `tl.dot`. Which tile a shape takes, and whether it beats cuBLAS at all, is the device's
tuning table's (`linear` entries, minivllm/engine/linear.py decides)."""

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.checks import check_float_inputs, check_rank, check_same_shape
from minivllm.kernels.rounding import round_to

MAX_ROWS = 16  # one 16-row dot tile; more rows are cuBLAS's shapes
# Its three forms (plain; after the residual add and RMSNorm; after SiLU-and-mul), each a kernel
# of its own in the tuning tables: the tuner times each against the unfused steps it replaces.
FORMS = ("linear", "norm_linear", "gated_linear")
# For direct calls with no tile (tests, the compile check's heuristic set): 16 columns a program
# gives N / 16 programs, a full wave of 132 SMs from N = 2112; 256-wide K steps keep 8 KB of
# weight in flight per stage at 4 warps.
DEFAULT_TILE = (16, 256, 4, 3)


@triton.jit
def _skinny_linear(
    X, RES, NW, W, OUT, RES_OUT, M, N, K, eps,
    stride_xm, stride_rm, stride_wn, stride_om, stride_rom,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERPRETER: tl.constexpr,
):
    dtype = OUT.dtype.element_ty
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    row_mask = rm < M
    # RMSNorm scales each row by one number, so the norm folds into the epilogue: the loop sums the
    # rows' squares beside the products of (x [+ residual]) * norm_weight, and the end multiplies
    # by the rows' 1 / rms. One pass over the activations, as over the weight.
    # One row sums on the CUDA cores: its products and squares accumulate lane by lane across the
    # K steps and are reduced across the tile once, after the loop, not once a step (a reduction
    # across warps is a barrier inside the weight stream's pipeline).
    sum_sq = tl.zeros((BLOCK_M, BLOCK_K if BLOCK_M == 1 else 1), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K) if BLOCK_M == 1 else (BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (rk[None, :] < K)
        w = tl.load(W + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        a = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0)
        if NORM:
            if HAS_RESIDUAL:
                # The residual stream is rounded as the unfused add rounds it; program 0 writes it.
                r = tl.load(RES + rm[:, None] * stride_rm + rk[None, :], mask=mask, other=0.0)
                a = round_to(a.to(tl.float32) + r.to(tl.float32), dtype, INTERPRETER)
                if pid == 0:
                    tl.store(RES_OUT + rm[:, None] * stride_rom + rk[None, :], a, mask=mask)
            af = a.to(tl.float32)
            sum_sq += af * af if BLOCK_M == 1 else tl.sum(af * af, axis=1, keep_dims=True)
            nw = tl.load(NW + rk, mask=rk < K, other=0.0).to(tl.float32)
            a = round_to(af * nw[None, :], dtype, INTERPRETER)
        if GATED:
            gate = a.to(tl.float32)
            up = tl.load(X + rm[:, None] * stride_xm + K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
            a = round_to(gate * tl.sigmoid(gate) * up, dtype, INTERPRETER)
        if BLOCK_M == 1:
            acc += a.to(tl.float32) * w.to(tl.float32)
        elif INTERPRETER or dtype == tl.float32:
            # fp32 stays exact (no TF32); the interpreter's bf16 dot is wrong, and fp32 products of
            # bf16 values are what the GPU's bf16 dot sums too.
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=1)[None, :]
        sum_sq = tl.sum(sum_sq, axis=1, keep_dims=True)
    if NORM:
        acc = acc * (1.0 / tl.sqrt(sum_sq / K + eps))
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :], round_to(acc, dtype, INTERPRETER), mask=row_mask[:, None] & (rn[None, :] < N))


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    tile: tuple[int, int, int, int] | None = None,
    out: torch.Tensor | None = None,
):
    """y = a @ weight.T for a few rows a, where a is x itself, or RMSNorm(x [+ residual]) when
    `norm_weight` is given, or silu(gate) * up when `gated`.

    x: (rows, K), or (rows, 2K) gate then up when `gated`; 1 <= rows <= MAX_ROWS; fp16/bf16/fp32,
        last dim contiguous.
    weight: (N, K) as nn.Linear holds it, same dtype, last dim contiguous.
    residual: (rows, K), same dtype, added to x before the norm (needs norm_weight).
    norm_weight: (K,), the RMSNorm's weight; eps > 0 its epsilon.
    tile: (BLOCK_N, BLOCK_K, num_warps, num_stages); DEFAULT_TILE when None.
    Returns y (rows, N) in x's dtype, written into `out` when given (rows, N, last dim contiguous),
    else a new tensor; with `residual`, (y, x + residual).
    """
    check_rank("x", x, 2, "(rows, K)")
    check_rank("weight", weight, 2, "(N, K)")
    check_float_inputs(**dict(x=x, weight=weight) | ({} if residual is None else dict(residual=residual)) | ({} if norm_weight is None else dict(norm_weight=norm_weight)))
    rows, n = x.shape[0], weight.shape[0]
    k = weight.shape[1]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows, got {rows}")
    if x.shape[1] != (2 * k if gated else k):
        want = f"2 x weight's K = {2 * k} columns (gate then up)" if gated else f"weight's K = {k} columns"
        raise ValueError(f"x must have {want}, got {x.shape[1]}")
    if gated and norm_weight is not None:
        raise ValueError("gated and norm_weight cannot be combined: the norm feeds qkv and gate_up, the gate feeds down")
    if residual is not None:
        if norm_weight is None:
            raise ValueError("residual needs norm_weight: the residual add is fused only into the norm")
        check_same_shape("x", x, "residual", residual)
    if norm_weight is not None:
        check_rank("norm_weight", norm_weight, 1, "(K,)")
        if norm_weight.shape[0] != k:
            raise ValueError(f"norm_weight must be (K,) = ({k},), got {tuple(norm_weight.shape)}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
    block_n, block_k, num_warps, num_stages = tile or DEFAULT_TILE
    if rows > 1 and block_n < 16:
        raise ValueError(f"tile's BLOCK_N must be at least 16 for more than one row (a 16 x 16 dot), got {block_n}")
    if out is None:
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    elif out.shape != (rows, n) or out.dtype != x.dtype or out.device != x.device or out.stride(1) != 1:
        raise ValueError(f"out must be {x.dtype} ({rows}, {n}) on {x.device}, contiguous in its last dimension")
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    _skinny_linear[(triton.cdiv(n, block_n),)](
        X=x, RES=res, NW=norm_weight if norm_weight is not None else weight, W=weight, OUT=out, RES_OUT=res_out, M=rows, N=n, K=k, eps=eps,
        stride_xm=x.stride(0), stride_rm=res.stride(0), stride_wn=weight.stride(0), stride_om=out.stride(0), stride_rom=res_out.stride(0),
        NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, GATED=gated,
        BLOCK_M=1 if rows == 1 else MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, INTERPRETER=interpreting(),
        num_warps=num_warps,
    )
    return out if residual is None else (out, res_out)
