"""FLOP and byte counts, and the extra_info every benchmark records beside its timings."""

import torch

PREFILL_CEILING, DECODE_CEILING = "matmul_tflops", "copy_gbps"


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float16', 'float32': how extra_info and group names spell a dtype."""
    return str(dtype).removeprefix("torch.")


def prefill_counts(batch, seqlen, num_heads, num_kv_heads, head_dim, causal, dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of one prefill: flash-attn's 4·b·h·s²·d, halved when causal; q, k, v read and
    out written once."""
    flops = 4 * batch * num_heads * seqlen**2 * head_dim // (2 if causal else 1)
    elem = torch.finfo(dtype).bits // 8
    nbytes = elem * batch * seqlen * head_dim * (2 * num_heads + 2 * num_kv_heads)
    return flops, nbytes


def prefix_counts(batch, prefix_len, new_len, num_heads, num_kv_heads, head_dim, causal, dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of prefilling `new_len` tokens after a cached `prefix_len`: every new token
    scores the whole prefix and, under causal, half the new tokens on average (the same halving
    as prefill_counts); q and out of the new tokens, k and v of all of them, once."""
    keys = prefix_len + (new_len / 2 if causal else new_len)
    flops = int(4 * batch * num_heads * new_len * keys * head_dim)
    elem = torch.finfo(dtype).bits // 8
    nbytes = elem * batch * head_dim * (2 * new_len * num_heads + 2 * (prefix_len + new_len) * num_kv_heads)
    return flops, nbytes


def decode_counts(batch, context_len, num_heads, num_kv_heads, head_dim, dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of one decode step: K and V of every context read once, plus q and out."""
    flops = 4 * batch * num_heads * context_len * head_dim
    elem = torch.finfo(dtype).bits // 8
    nbytes = elem * batch * head_dim * (2 * context_len * num_kv_heads + 2 * num_heads)
    return flops, nbytes


def record(benchmark, ceilings: dict, *, suite: str, impl: str, shard, dtype: torch.dtype, flops: int, nbytes: int, **shape) -> None:
    """Fill benchmark.extra_info: the configuration, the counts, and the throughput from the median
    time as a percentage of the run's measured ceiling (TFLOP/s for prefill, GB/s for decode)."""
    info = benchmark.extra_info
    info.update(suite=suite, impl=impl, model=shard.model, tp=shard.tp, num_heads=shard.num_heads)
    info.update(num_kv_heads=shard.num_kv_heads, head_dim=shard.head_dim, dtype=dtype_name(dtype))
    info.update(shape, flops=flops, bytes=nbytes)
    info.setdefault("causal", None)
    info.setdefault("block_size", None)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    median = benchmark.stats.stats.median
    if suite in ("prefill", "prefix"):
        info.update(tflops=flops / median / 1e12, ceiling=PREFILL_CEILING)
        info["pct_of_ceiling"] = 100 * info["tflops"] / ceilings[PREFILL_CEILING]
    else:
        info.update(gbps=nbytes / median / 1e9, ceiling=DECODE_CEILING)
        info["pct_of_ceiling"] = 100 * info["gbps"] / ceilings[DECODE_CEILING]
