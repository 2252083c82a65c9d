"""Prefill after a prefix-cache hit: the second half of each sequence attends to the whole of it.

flash_triton reads the keys packed contiguously; flash_triton_paged16 and flash_triton_paged256
read the same keys from a paged cache through a scattered block table, with blocks of 16 and 256
tokens, so the cost of paging shows against the contiguous path at the same shape. Each output is
checked against the float64 reference before it is timed.
"""

import pytest

from benchmarks.extra_info import prefix_counts, record
from benchmarks.grid import GPU_GRID
from benchmarks.timing import measure
from minivllm.dtypes import dtype_name
from minivllm.kernels import flash_attn_varlen
from minivllm.kernels.flash_attention import prefill_config
from minivllm.reference.inputs import cu_seqlens, generator, paged_cache, randn
from minivllm.reference.paging import paged_gather
from minivllm.reference.prefill_check import check_prefill

SEQLENS = (4096,) if GPU_GRID else (67,)  # prefix + new tokens per sequence
TOKENS = 16384 if GPU_GRID else 134
CAUSAL = (False, True) if GPU_GRID else (True,)
IMPLS = {"flash_triton": None, "flash_triton_paged16": 16, "flash_triton_paged256": 256} if GPU_GRID else {"flash_triton": None, "flash_triton_paged16": 16}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", CAUSAL, ids=lambda c: "causal" if c else "full")
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_prefix(benchmark, request, device, ceiling, cold_round, shard, dtype, seqlen, causal, impl):
    batch, new = max(1, TOKENS // seqlen), seqlen - seqlen // 2
    prefix = seqlen - new
    gen = generator(seqlen, device)
    q = randn((batch * new, shard.num_heads, shard.head_dim), dtype, device, gen)
    cache = paged_cache([seqlen] * batch, IMPLS[impl] or 16, shard.num_kv_heads, shard.head_dim, dtype, device, gen)
    # The contiguous keys are the paged ones gathered, so every impl attends to the same data.
    k = paged_gather(cache.k_cache, cache.block_table, seqlen).reshape(batch * seqlen, shard.num_kv_heads, shard.head_dim)
    v = paged_gather(cache.v_cache, cache.block_table, seqlen).reshape(batch * seqlen, shard.num_kv_heads, shard.head_dim)
    cu_q, cu_k = cu_seqlens([new] * batch, device), cu_seqlens([seqlen] * batch, device)
    source = prefill_config(q, cache.k_cache if IMPLS[impl] else k, seqlen, causal, paged=IMPLS[impl] is not None)[1]
    if IMPLS[impl] is None:
        del cache  # only the contiguous copy is read
        fn = lambda: flash_attn_varlen(q, k, v, cu_q, cu_k, new, seqlen, causal=causal)  # noqa: E731
    else:
        fn = lambda: flash_attn_varlen(q, cache.k_cache, cache.v_cache, cu_q, cu_k, new, seqlen, causal=causal, block_table=cache.block_table)  # noqa: E731
    check_prefill(fn(), q, k, v, batch, new, causal, impl, prefix=prefix)

    benchmark.group = f"prefix {shard.id} {dtype_name(dtype)} {'causal' if causal else 'full'} b={batch} s={seqlen}"
    measure(benchmark, fn, device, request.config, cold_round)
    flops, nbytes = prefix_counts(batch, prefix, new, shard.num_heads, shard.num_kv_heads, shard.head_dim, causal, dtype)
    record(benchmark, ceiling, suite="prefix", impl=impl, shard=shard, dtype=dtype, flops=flops, nbytes=nbytes, batch=batch, seqlen=seqlen, causal=causal, block_size=IMPLS[impl], config_source=source)
