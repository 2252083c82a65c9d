"""Reading tokens out of a paged KV cache."""

import torch


def paged_gather(cache, block_table, num_tokens):
    """Gather token positions 0..num_tokens-1 of every sequence from a paged cache.

    cache: (num_blocks, block_size, Hkv, D). block_table: int32 (batch, max_blocks_per_seq),
    padded with -1; token j of sequence b lives at
    cache[block_table[b, j // block_size], j % block_size].
    Returns (batch, num_tokens, Hkv, D) in cache.dtype. Positions past a sequence's
    own length hold arbitrary cache data: the caller must mask them.
    """
    block_size = cache.shape[1]
    pos = torch.arange(num_tokens, device=cache.device)
    # Past a sequence's end the table holds -1 padding, which indexes the last block:
    # harmless, since the caller masks those positions.
    blocks = block_table[:, pos // block_size].long()  # (batch, num_tokens)
    return cache[blocks, pos % block_size]
