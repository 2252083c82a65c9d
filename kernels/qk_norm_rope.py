"""Qwen3's attention inputs in one pass per token: the per-head RMSNorm of q and k followed by
the rotary embedding, reading the fused qkv projection's q and k in place."""

import torch
import triton
import triton.language as tl

from kernels.checks import check_float_inputs, check_rank
from kernels.launch import interpreting
from kernels.rounding import round_to


@triton.jit
def _norm_rope_heads(X, stride_h, W, O, stride_oh, heads, c1, c2, s1, s2, eps,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     INTERPRETER: tl.constexpr):
    """One token's `heads` heads of X: normalise each over HEAD_DIM, then rotate (x[i], x[i+HALF])."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < heads) & (offs_d < HALF)
    x1 = tl.load(X + offs_h * stride_h + offs_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs_h * stride_h + HALF + offs_d, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
    w1 = tl.load(W + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(W + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    dtype = O.dtype.element_ty
    # Rounded to the model dtype after the norm and after the weight, as the unfused model is.
    n1 = round_to(round_to(x1 * rstd, dtype, INTERPRETER).to(tl.float32) * w1, dtype, INTERPRETER).to(tl.float32)
    n2 = round_to(round_to(x2 * rstd, dtype, INTERPRETER).to(tl.float32) * w2, dtype, INTERPRETER).to(tl.float32)
    tl.store(O + offs_h * stride_oh + offs_d, round_to(n1 * c1 - n2 * s1, dtype, INTERPRETER), mask=mask)
    tl.store(O + offs_h * stride_oh + HALF + offs_d, round_to(n2 * c2 + n1 * s2, dtype, INTERPRETER), mask=mask)


@triton.jit
def _qk_norm_rope(
    Q, K, QW, KW, COS, SIN, QO, KO, num_heads, num_kv_heads, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st, stride_qot, stride_qoh, stride_kot, stride_koh,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    ok = offs < HALF
    c1 = tl.load(COS + t * stride_ct + offs, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t * stride_ct + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * stride_st + offs, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * stride_st + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    _norm_rope_heads(Q + t * stride_qt, stride_qh, QW, QO + t * stride_qot, stride_qoh, num_heads, c1, c2, s1, s2, eps,
                     HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF, INTERPRETER)
    _norm_rope_heads(K + t * stride_kt, stride_kh, KW, KO + t * stride_kot, stride_koh, num_kv_heads, c1, c2, s1, s2, eps,
                     HEAD_DIM, HALF, BLOCK_HKV, BLOCK_HALF, INTERPRETER)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of reference.qk_norm_rope_ref.

    q: (num_tokens, heads, head_dim); k: (num_tokens, kv_heads, head_dim); both fp16/bf16/fp32
        with the last dim contiguous (views into the fused qkv projection are fine); head_dim even.
    q_weight, k_weight: (head_dim,), the per-head RMSNorm weights; cos, sin: (num_tokens,
        head_dim), the rotate-half angles of each token (reference.rope_cos_sin); all one dtype.
    Returns new contiguous (q, k), normalised in fp32 and rotated.
    """
    check_rank("q", q, 3, "(num_tokens, heads, head_dim)")
    check_rank("k", k, 3, "(num_tokens, kv_heads, head_dim)")
    for name, t in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_rank(name, t, 1, "(head_dim,)")
    for name, t in (("cos", cos), ("sin", sin)):
        check_rank(name, t, 2, "(num_tokens, head_dim)")
    check_float_inputs(q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin)
    tokens, head_dim = q.shape[0], q.shape[2]
    for name, t, want in (("k", k, (tokens, k.shape[1], head_dim)), ("q_weight", q_weight, (head_dim,)),
                          ("k_weight", k_weight, (head_dim,)), ("cos", cos, (tokens, head_dim)), ("sin", sin, (tokens, head_dim))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} to match q {tuple(q.shape)}, got {tuple(t.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for the rotate-half embedding, got {head_dim}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens:
        _qk_norm_rope[(tokens,)](
            Q=q, K=k, QW=q_weight, KW=k_weight, COS=cos, SIN=sin, QO=q_out, KO=k_out,
            num_heads=q.shape[1], num_kv_heads=k.shape[1], eps=eps,
            stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
            stride_ct=cos.stride(0), stride_st=sin.stride(0),
            stride_qot=q_out.stride(0), stride_qoh=q_out.stride(1), stride_kot=k_out.stride(0), stride_koh=k_out.stride(1),
            HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(q.shape[1]),
            BLOCK_HKV=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            INTERPRETER=interpreting(), num_warps=4,
        )
    return q_out, k_out
