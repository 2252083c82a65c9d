"""Decode with a shared prefix: cascade attention against plain paged decode over the same cache.

Every sequence of a batch begins with the same `shared_len` tokens in the same scattered blocks,
as the prefix cache leaves one system prompt, then holds a suffix of its own (seeded lengths,
grid.shared_prefix_lens). triton_paged reads the prefix once per sequence (the L2 may serve some
of the repeats); triton_cascade reads it once per tile of sequences. Each output is checked against
the float64 reference before it is timed. Both are GB/s of the same count, the least any decode
must read: the prefix's K and V once, each suffix's once, plus q and out.
"""

import pytest
import torch

from benchmarks.extra_info import decode_counts, record
from benchmarks.grid import GPU_GRID, shared_prefix_lens
from benchmarks.timing import measure
from minivllm.dtypes import dtype_name
from minivllm.kernels import cascade_attention_decode, paged_attention_decode
from minivllm.kernels.cascade_attention import cascade_config
from minivllm.reference.decode_check import check_decode
from minivllm.reference.inputs import generator, paged_cache, randn, share_prefix

BATCHES = (64, 256) if GPU_GRID else (5,)
SHARED_LENS = (2048,) if GPU_GRID else (32,)
BLOCK_SIZES = (16, 256) if GPU_GRID else (16,)
IMPLS = ("triton_paged", "triton_cascade")


def cascade_counts(batch, shared_len, suffix_lens, num_heads, num_kv_heads, head_dim, dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of one decode step over a shared prefix: every sequence scores all of its
    context, but the least a step must read is the prefix's K and V once and each suffix's once,
    plus q and out."""
    flops = sum(decode_counts(1, shared_len + n, num_heads, num_kv_heads, head_dim, dtype)[0] for n in suffix_lens)
    elem = torch.finfo(dtype).bits // 8
    nbytes = elem * head_dim * (2 * num_kv_heads * (shared_len + sum(suffix_lens)) + 2 * batch * num_heads)
    return flops, nbytes


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shared_len", SHARED_LENS)
@pytest.mark.parametrize("batch", BATCHES)
def test_cascade(benchmark, request, device, ceiling, cold_round, shard, dtype, batch, shared_len, block_size, impl):
    lens = shared_prefix_lens(batch, shared_len, GPU_GRID)
    suffixes = [n - shared_len for n in lens]
    gen = generator(batch + shared_len, device)
    q = randn((batch, shard.num_heads, shard.head_dim), dtype, device, gen)
    cache = share_prefix(paged_cache(lens, block_size, shard.num_kv_heads, shard.head_dim, dtype, device, gen), lens, shared_len // block_size)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, cache.k_cache, cache.v_cache, cache.block_table, context_lens)
    if impl == "triton_paged":
        fn = lambda: paged_attention_decode(*args, max_context_len=max(lens))  # noqa: E731
    else:
        shared = torch.tensor([shared_len], dtype=torch.int32, device=device)
        fn = lambda: cascade_attention_decode(*args, shared, max_context_len=max(lens), max_shared_len=shared_len)  # noqa: E731
    check_decode(fn(), q, cache, context_lens, impl)

    benchmark.group = f"cascade {shard.id} {dtype_name(dtype)} block={block_size} b={batch} shared={shared_len}"
    measure(benchmark, fn, device, request.config, cold_round)
    flops, nbytes = cascade_counts(batch, shared_len, suffixes, shard.num_heads, shard.num_kv_heads, shard.head_dim, dtype)
    source = {}
    if impl == "triton_cascade":
        source["config_source"] = cascade_config(device, dtype, shard.head_dim, block_size, batch, shard.num_heads, shard.num_kv_heads, shared_len).source
    record(benchmark, ceiling, suite="cascade", impl=impl, shard=shard, dtype=dtype, flops=flops, nbytes=nbytes, batch=batch,
           shared_len=shared_len, context_len=max(lens), block_size=block_size, **source)
