"""Varlen attention, "PyTorch Standard": one full score matrix per sequence."""

import torch

from .dense import dense_attention
from .masks import causal_mask
from .paging import paged_gather


def attention_ref(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    softmax_scale=None,
    causal=True,
    block_table=None,
    compute_dtype=None,
):
    """Attention over packed variable-length sequences (flash-attn varlen layout).

    q: (total_q, H, D). cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of
    the per-sequence query and key counts.
    Without block_table: k, v are packed (total_k, Hkv, D), sequence b's keys are rows
    cu_seqlens_k[b]:cu_seqlens_k[b + 1].
    With block_table (int32 (batch, max_blocks_per_seq), -1 padded): k, v are paged
    caches (num_blocks, block_size, Hkv, D) and sequence b's Lk keys (cached prefix
    plus new tokens) are its positions 0..Lk-1 gathered through block_table[b].
    H % Hkv == 0; query head h uses kv head h // (H // Hkv).
    softmax_scale defaults to 1 / sqrt(D). causal uses the bottom-right aligned mask
    (query i sees key j iff j <= i + Lk - Lq). compute_dtype None computes in q.dtype;
    otherwise inputs are cast to it first.
    Returns (total_q, H, D) in compute_dtype (q.dtype if None); query rows that see
    no key are exactly 0.
    """
    dtype = compute_dtype or q.dtype
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()

    for b in range(len(cu_q) - 1):
        q_start, q_end = cu_q[b], cu_q[b + 1]
        len_q, len_k = q_end - q_start, cu_k[b + 1] - cu_k[b]
        if block_table is None:
            k_seq, v_seq = k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        else:
            k_seq = paged_gather(k, block_table[b : b + 1], len_k)[0]
            v_seq = paged_gather(v, block_table[b : b + 1], len_k)[0]

        if causal:
            mask = causal_mask(len_q, len_k, device=q.device)
        else:
            mask = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)

        # dense_attention is head-first: (L, H, D) -> (H, L, D) and back.
        out[q_start:q_end] = dense_attention(
            q[q_start:q_end].to(dtype).transpose(0, 1),
            k_seq.to(dtype).transpose(0, 1),
            v_seq.to(dtype).transpose(0, 1),
            mask,
            scale,
        ).transpose(0, 1)
    return out
