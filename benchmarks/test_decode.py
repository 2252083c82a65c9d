"""Decode attention over a paged KV cache: our Triton kernel against the PyTorch references and
the unpaged limit, SDPA over a contiguous cache holding the same bytes.

Every sequence of a batch holds `context_len` tokens in scattered blocks. Each implementation's
output is checked against the float64 reference before it is timed; a wrong one is never timed.
Decode is memory-bound, so the figure is GB/s of K and V read (plus q and out).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.extra_info import decode_counts, record
from benchmarks.grid import GPU_GRID
from benchmarks.timing import measure
from minivllm.dtypes import dtype_name
from minivllm.kernels import paged_attention_decode
from minivllm.kernels.paged_attention import decode_config
from minivllm.reference import paged_decode_gather, paged_decode_loop
from minivllm.reference.decode_check import check_decode
from minivllm.reference.inputs import generator, paged_cache, randn
from minivllm.reference.paging import paged_gather

BATCHES = (1, 4, 16, 64, 256) if GPU_GRID else (3,)
CONTEXTS = (512, 2048, 8192, 32768) if GPU_GRID else (77,)
BLOCK_SIZES = (16, 256) if GPU_GRID else (16,)
IMPLS = ("torch_loop", "torch_gather", "triton_paged", "sdpa_dense")
LOOP_MAX_BLOCKS = 4096  # torch_loop slices every block in Python; past this one call takes seconds
# Copies of the K/V cache each implementation holds at its peak: the paged cache, plus a
# gathered copy (torch_gather) or the contiguous cache built from it (sdpa_dense).
CACHE_COPIES = {"torch_loop": 1, "torch_gather": 2, "triton_paged": 1, "sdpa_dense": 2}


def _implementation(impl, q, cache, context_lens, context_len):
    """A no-argument callable running one decode step of `impl`, returning (batch, heads, head_dim).
    It holds nothing but the call, since it is what gets timed."""
    kc, vc, table = cache.k_cache, cache.v_cache, cache.block_table
    if impl == "torch_loop":
        return lambda: paged_decode_loop(q, kc, vc, table, context_lens)
    if impl == "torch_gather":
        return lambda: paged_decode_gather(q, kc, vc, table, context_lens)
    if impl == "triton_paged":
        return lambda: paged_attention_decode(q, kc, vc, table, context_lens, max_context_len=context_len)
    # (batch, kv_heads, context, head_dim) contiguous: the layout SDPA reads best, which makes it
    # the unpaged limit rather than a strawman.
    k, v = (torch.empty(q.shape[0], kc.shape[2], context_len, kc.shape[3], dtype=kc.dtype, device=kc.device) for _ in "kv")
    for b in range(q.shape[0]):  # a sequence at a time: a whole-batch gather would be a third copy
        k[b] = paged_gather(kc, table[b : b + 1], context_len)[0].transpose(0, 1)
        v[b] = paged_gather(vc, table[b : b + 1], context_len)[0].transpose(0, 1)
    q4 = q[:, :, None]
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=gqa)[:, :, 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("context_len", CONTEXTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_decode(benchmark, request, device, ceiling, cold_round, free_bytes, shard, dtype, batch, context_len, block_size, impl):
    blocks = batch * math.ceil(context_len / block_size)
    if impl == "torch_loop" and blocks > LOOP_MAX_BLOCKS:
        pytest.skip(f"torch_loop walks {blocks} blocks in Python per call; past {LOOP_MAX_BLOCKS} a call takes seconds")
    cache_bytes = 2 * blocks * block_size * shard.num_kv_heads * shard.head_dim * torch.finfo(dtype).bits // 8
    need = CACHE_COPIES[impl] * cache_bytes
    if need > 0.8 * free_bytes:
        pytest.skip(f"{impl} needs {need / 2**30:.1f} GiB for a {cache_bytes / 2**30:.1f} GiB KV cache; {free_bytes / 2**30:.1f} GiB free")

    gen = generator(context_len + batch, device)
    q = randn((batch, shard.num_heads, shard.head_dim), dtype, device, gen)
    cache = paged_cache([context_len] * batch, block_size, shard.num_kv_heads, shard.head_dim, dtype, device, gen)
    context_lens = torch.full((batch,), context_len, dtype=torch.int32, device=device)

    fn = _implementation(impl, q, cache, context_lens, context_len)
    check_decode(fn(), q, cache, context_lens, impl)
    if impl == "sdpa_dense":
        del cache  # it reads its own contiguous copy; free the paged one before timing

    benchmark.group = f"decode {shard.id} {dtype_name(dtype)} block={block_size} b={batch} ctx={context_len}"
    measure(benchmark, fn, device, request.config, cold_round)
    flops, nbytes = decode_counts(batch, context_len, shard.num_heads, shard.num_kv_heads, shard.head_dim, dtype)
    # Which source chose our kernel's config (tuning table, its family's, or the heuristic), so
    # a reader sees when a GPU ran untuned.
    source = {"config_source": decode_config(q, cache.k_cache, cache.v_cache, context_len).source} if impl == "triton_paged" else {}
    record(benchmark, ceiling, suite="decode", impl=impl, shard=shard, dtype=dtype, flops=flops, nbytes=nbytes, batch=batch, context_len=context_len, block_size=block_size, **source)
