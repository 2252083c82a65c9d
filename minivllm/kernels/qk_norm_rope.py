"""Qwen3's attention inputs in one pass per token: the per-head RMSNorm of q and k followed by
the rotary embedding, reading the fused qkv projection's q and k in place; optionally also
writing the rotated k and the untouched v into their paged KV-cache slots, so the step needs no
separate store kernel (minivllm/kernels/kv_cache.py's contract)."""

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.checks import check_float_inputs, check_rank
from minivllm.kernels.kv_cache import check_kv_store
from minivllm.kernels.rounding import round_to


@triton.jit
def _norm_rope_heads(X, stride_h, W, O, stride_oh, C, stride_ch, c_heads, heads, c1, c2, s1, s2, eps,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     STORE_C: tl.constexpr, INTERPRETER: tl.constexpr):
    """One token's `heads` heads of X: normalise each over HEAD_DIM, then rotate (x[i], x[i+HALF]),
    into O and, with STORE_C, the first `c_heads` of them into C too."""
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
    r1, r2 = round_to(n1 * c1 - n2 * s1, dtype, INTERPRETER), round_to(n2 * c2 + n1 * s2, dtype, INTERPRETER)
    tl.store(O + offs_h * stride_oh + offs_d, r1, mask=mask)
    tl.store(O + offs_h * stride_oh + HALF + offs_d, r2, mask=mask)
    if STORE_C:
        c_mask = (offs_h < c_heads) & (offs_d < HALF)
        tl.store(C + offs_h * stride_ch + offs_d, r1, mask=c_mask)
        tl.store(C + offs_h * stride_ch + HALF + offs_d, r2, mask=c_mask)


@triton.jit
def _copy_heads(X, stride_h, C, stride_ch, heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's first `heads` heads of X into C, as two halves of HALF."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < heads) & (offs_d < HALF)
    for half in tl.static_range(2):
        x = tl.load(X + offs_h * stride_h + half * HALF + offs_d, mask=mask)
        tl.store(C + offs_h * stride_ch + half * HALF + offs_d, x, mask=mask)


@triton.jit
def _qk_norm_rope(
    Q, K, QW, KW, COS, SIN, QO, KO, V, KC, VC, SLOTS, num_heads, num_kv_heads, num_slots, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_vt, stride_vh, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PAGE: tl.constexpr, STORE: tl.constexpr, INTERPRETER: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if STORE:
        slot = tl.load(SLOTS + t).to(tl.int64)
    else:
        slot = tl.full((), -1, tl.int64)
    # -1 marks a token with no slot (padding); out-of-range slots are skipped, never written: such
    # a token stores 0 heads.
    cache_heads = tl.where((slot >= 0) & (slot < num_slots), num_kv_heads, 0)
    slot = tl.maximum(slot, 0)
    k_slot = KC + (slot // PAGE) * stride_kcb + (slot % PAGE) * stride_kct
    v_slot = VC + (slot // PAGE) * stride_vcb + (slot % PAGE) * stride_vct
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    ok = offs < HALF
    c1 = tl.load(COS + t * stride_ct + offs, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t * stride_ct + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * stride_st + offs, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * stride_st + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    q_out = QO + t * stride_qot
    _norm_rope_heads(Q + t * stride_qt, stride_qh, QW, q_out, stride_qoh, q_out, stride_qoh, 0, num_heads,
                     c1, c2, s1, s2, eps, HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF, False, INTERPRETER)
    _norm_rope_heads(K + t * stride_kt, stride_kh, KW, KO + t * stride_kot, stride_koh, k_slot, stride_kch, cache_heads, num_kv_heads,
                     c1, c2, s1, s2, eps, HEAD_DIM, HALF, BLOCK_HKV, BLOCK_HALF, STORE, INTERPRETER)
    if STORE:
        _copy_heads(V + t * stride_vt, stride_vh, v_slot, stride_vch, cache_heads, HALF, BLOCK_HKV, BLOCK_HALF)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float, *, v=None, k_cache=None, v_cache=None,
                 slot_mapping=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of reference.qk_norm_rope_ref; with v, k_cache, v_cache and slot_mapping, also
    that of kernels.store_kvcache(k_out, v, k_cache, v_cache, slot_mapping) in the same pass.

    q: (num_tokens, heads, head_dim); k, v: (num_tokens, kv_heads, head_dim); all fp16/bf16/fp32
        with the last dim contiguous (views into the fused qkv projection are fine); head_dim even.
    q_weight, k_weight: (head_dim,), the per-head RMSNorm weights; cos, sin: (num_tokens,
        head_dim), the rotate-half angles of each token (reference.rope_cos_sin); all one dtype.
    k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim); slot_mapping int32/int64
        (num_tokens,), -1 skipping a token (store_kvcache's contract).
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
    cache = (v, k_cache, v_cache, slot_mapping)
    store = all(t is not None for t in cache)
    if not store and any(t is not None for t in cache):
        raise ValueError("v, k_cache, v_cache and slot_mapping go together: pass all four to store into the cache, or none")
    if store:
        slot_mapping = check_kv_store(k, v, k_cache, v_cache, slot_mapping)
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if not store:  # the store is compiled out; these only fill its arguments
        v, k_cache, v_cache, slot_mapping = k, k_out[None], k_out[None], k_out
    if tokens:
        _qk_norm_rope[(tokens,)](
            Q=q, K=k, QW=q_weight, KW=k_weight, COS=cos, SIN=sin, QO=q_out, KO=k_out, V=v, KC=k_cache, VC=v_cache,
            SLOTS=slot_mapping, num_heads=q.shape[1], num_kv_heads=k.shape[1], num_slots=k_cache.shape[0] * k_cache.shape[1], eps=eps,
            stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
            stride_ct=cos.stride(0), stride_st=sin.stride(0),
            stride_qot=q_out.stride(0), stride_qoh=q_out.stride(1), stride_kot=k_out.stride(0), stride_koh=k_out.stride(1),
            stride_vt=v.stride(0), stride_vh=v.stride(1),
            stride_kcb=k_cache.stride(0), stride_kct=k_cache.stride(1), stride_kch=k_cache.stride(2),
            stride_vcb=v_cache.stride(0), stride_vct=v_cache.stride(1), stride_vch=v_cache.stride(2),
            HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(q.shape[1]),
            BLOCK_HKV=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            PAGE=k_cache.shape[1] if store else 1, STORE=store, INTERPRETER=interpreting(), num_warps=4,
        )
    return q_out, k_out
