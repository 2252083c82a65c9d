"""Writing new tokens into a paged KV cache."""


def store_kvcache_ref(key, value, k_cache, v_cache, slot_mapping):
    """Write token t of key/value into flattened cache slot slot_mapping[t], in place.

    key, value: (num_tokens, Hkv, D). k_cache, v_cache: (num_blocks, block_size, Hkv, D),
    same dtype as key/value. slot_mapping: int (num_tokens,), slot = block_id *
    block_size + offset; -1 means the token is not stored. Returns None.
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    # Index by (block, offset) rather than viewing the cache flat, so a
    # non-contiguous cache is still written in place.
    k_cache[slots // block_size, slots % block_size] = key[keep]
    v_cache[slots // block_size, slots % block_size] = value[keep]
