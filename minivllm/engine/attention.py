"""Paged attention for the model's layers: one step's metadata, and the attend step that reads it.

The model runner builds an AttentionMetadata once per step; every layer stores the step's keys
and values in its KV cache (with the q/k norm and rotary, Backend.norm_rope_store), then passes
the metadata and its cache to `attend`, which runs the backend's attention (minivllm/engine/backend.py:
our kernels, or the PyTorch references of the same contracts).
"""

from dataclasses import dataclass

import torch

from minivllm.engine.backend import Backend


@dataclass
class AttentionMetadata:
    """One step's view of the batch, built once and shared by every layer.

    slot_mapping: int32 (num_tokens,), cache slot of each new token (block_id * block_size +
        offset); -1 skips the write (padding rows of a CUDA graph).
    Prefill: the first `decode_rows` tokens are rows of one new token each, attended as decode
        rows are (context_lens, max_context_len and decode_block_tables below, for them alone);
        the other rows follow: cu_seqlens_q / cu_seqlens_k int32 (rows+1,) count their new tokens
        / all their tokens (cached prefix included); max_seqlen_q / max_seqlen_k host ints.
        block_tables is set only when one of them has a cached prefix, in which case their keys
        are read from the paged cache.
    Decode: context_lens int32 (batch,), block_tables int32 (batch, max_blocks), -1 padded;
        max_context_len a host int bounding context_lens. For cascade attention, shared_len int32
        (1,): the tokens of row 0's leading blocks that every row holding that many shares;
        max_shared_len a host int bounding it.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    context_lens: torch.Tensor | None = None
    max_context_len: int = 0
    block_tables: torch.Tensor | None = None
    shared_len: torch.Tensor | None = None
    max_shared_len: int = 0
    decode_rows: int = 0
    decode_block_tables: torch.Tensor | None = None


def attend(q, k, v, k_cache, v_cache, meta: AttentionMetadata, backend: Backend) -> torch.Tensor:
    """Attend, this step's k and v already in the cache.

    q: (num_tokens, H, D); k, v: (num_tokens, Hkv, D); caches (num_blocks, block_size, Hkv, D).
    Returns (num_tokens, H, D). Prefill is causal within each sequence, after its cached prefix.
    """
    if meta.is_prefill:
        # One-token rows on the decode kernel: the prefill kernel would give each a whole tile of
        # queries and, where it copies a batch's keys out first, copy their contexts too.
        d = meta.decode_rows
        out = torch.empty_like(q)
        if d:
            backend.decode(q[:d], k_cache, v_cache, meta.decode_block_tables, meta.context_lens, meta.max_context_len, out=out[:d])
        if q.shape[0] > d:
            keys, values = (k_cache, v_cache) if meta.block_tables is not None else (k[d:], v[d:])
            backend.prefill(q[d:], keys, values, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k, meta.block_tables,
                            out=out[d:])
        return out
    if meta.shared_len is not None:
        return backend.cascade_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.max_context_len, meta.shared_len, meta.max_shared_len)
    return backend.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.max_context_len)
