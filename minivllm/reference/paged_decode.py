"""Single-token decode over a paged KV cache: a naive and a vectorised reference."""

import math

import torch

from .dense import dense_attention
from .paging import paged_gather


def paged_decode_loop(
    q,
    k_cache,
    v_cache,
    block_table,
    context_lens,
    *,
    softmax_scale=None,
    compute_dtype=None,
):
    """The "Naive PyTorch" decode: Python loops over sequences and over their blocks.

    q: (batch, H, D), one query per sequence, the newest token, so it sees all of its
    context and needs no causal mask. k_cache, v_cache: (num_blocks, block_size, Hkv, D).
    block_table: int32 (batch, max_blocks_per_seq), -1 padded; token j of sequence b is
    at cache[block_table[b, j // block_size], j % block_size]. context_lens: int
    (batch,), number of cached tokens per sequence. H % Hkv == 0; query head h uses kv
    head h // (H // Hkv). softmax_scale defaults to 1 / sqrt(D). compute_dtype None
    computes in q.dtype.
    Returns (batch, H, D) in compute_dtype (q.dtype if None); a sequence with
    context_len 0 outputs 0.
    """
    dtype = compute_dtype or q.dtype
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    block_size = k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)

    for b, context_len in enumerate(context_lens.tolist()):
        if context_len == 0:
            continue
        k_blocks, v_blocks = [], []
        for i in range(math.ceil(context_len / block_size)):
            block = int(block_table[b, i])
            used = min(block_size, context_len - i * block_size)
            k_blocks.append(k_cache[block, :used])
            v_blocks.append(v_cache[block, :used])
        k = torch.cat(k_blocks).to(dtype).transpose(0, 1)  # (Hkv, context_len, D)
        v = torch.cat(v_blocks).to(dtype).transpose(0, 1)
        mask = torch.ones(1, context_len, dtype=torch.bool, device=q.device)
        out[b] = dense_attention(q[b, :, None].to(dtype), k, v, mask, scale)[:, 0]
    return out


def paged_decode_gather(
    q,
    k_cache,
    v_cache,
    block_table,
    context_lens,
    *,
    softmax_scale=None,
    compute_dtype=None,
):
    """The "Optimized PyTorch" decode: gather all contexts at once, one masked attention.

    Same arguments, layouts and result as paged_decode_loop: q (batch, H, D); caches
    (num_blocks, block_size, Hkv, D); block_table int32 (batch, max_blocks_per_seq),
    -1 padded; context_lens (batch,). Returns (batch, H, D) in compute_dtype (q.dtype
    if None); a sequence with context_len 0 outputs 0.
    """
    dtype = compute_dtype or q.dtype
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    max_ctx = max(context_lens.tolist(), default=0)

    k = paged_gather(k_cache, block_table, max_ctx).to(
        dtype
    )  # (batch, max_ctx, Hkv, D)
    v = paged_gather(v_cache, block_table, max_ctx).to(dtype)
    positions = torch.arange(max_ctx, device=q.device)
    valid = positions[None, :] < context_lens[:, None].to(q.device)  # (batch, max_ctx)
    # Slots past a context are whatever the cache held, NaN included; a masked score gives them
    # probability 0, but 0 x NaN is NaN, so their values are cleared (in place: v is a fresh gather).
    v.masked_fill_(~valid[:, :, None, None], 0.0)

    out = dense_attention(
        q[:, :, None].to(dtype),  # (batch, H, 1, D)
        k.transpose(1, 2),  # (batch, Hkv, max_ctx, D)
        v.transpose(1, 2),
        valid[:, None, :],  # (batch, 1, max_ctx)
        scale,
    )
    return out[:, :, 0]
