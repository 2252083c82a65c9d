"""FLOP and byte counts, and the extra_info every benchmark records beside its timings.

Prefill and prefix figures are a percentage of matmul_tflops; decode figures, of read_gbps, the
rate of a kernel that only reads (decode reads K and V and writes next to nothing), not of
copy_gbps, which a read-only kernel can beat. benchmarks/ceilings.py measures both.
"""

import torch

from minivllm.dtypes import dtype_name
from minivllm.engine.request_metrics import percentiles

PREFILL_CEILING, DECODE_CEILING = "matmul_tflops", "read_gbps"


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


def _configuration(info: dict, suite: str, impl: str, shard, dtype: torch.dtype) -> None:
    """The fields every suite's extra_info starts with: what ran, on which shard, in which dtype."""
    info.update(suite=suite, impl=impl, model=shard.model, tp=shard.tp, num_heads=shard.num_heads)
    info.update(num_kv_heads=shard.num_kv_heads, head_dim=shard.head_dim, dtype=dtype_name(dtype))


def record(benchmark, ceilings: dict, *, suite: str, impl: str, shard, dtype: torch.dtype, flops: int, nbytes: int, **shape) -> None:
    """Fill benchmark.extra_info: the configuration, the counts, and the throughput from the median
    time as a percentage of the run's measured ceiling, named in extra_info["ceiling"]: TFLOP/s
    of matmul_tflops for prefill and prefix, GB/s of read_gbps for decode."""
    info = benchmark.extra_info
    _configuration(info, suite, impl, shard, dtype)
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


def kv_token_bytes(preset, dtype: torch.dtype) -> int:
    """One token's K and V over all of a dense `preset`'s layers, in bytes of `dtype`."""
    return torch.finfo(dtype).bits // 8 * 2 * preset.layers * preset.num_kv_heads * preset.head_dim


def engine_counts(preset, prompt_lens: list[int], output_lens: list[int], dtype: torch.dtype, shared_prefix: int = 0) -> dict:
    """What a generate() run of a dense Qwen3 `preset` must move and compute at the least. The
    first `shared_prefix` tokens of every prompt are the same and computed once.

    weight_bytes: what one decode step reads: every layer's projections and norms, the final norm
        and the (vocab, hidden) lm_head, which a tied model shares with the embedding. Embedding
        rows gathered per token are left out.
    decode_steps: max(output_lens) - 1. Each sequence's first token comes from its prefill; after
        that, a schedule that decodes every sequence in the same step needs this many steps, and
        each reads the weights once.
    kv_bytes: each decode step reads the K and V of every token some sequence attends to, once: the
        t-th decoded token of a sequence with prompt p sees p + t tokens, of which the shared
        prefix's are the same blocks for every sequence, read once per step while any decodes
        (charging it once per sequence made the shared-prefix workload beat its floor).
    prefill_flops: 2 x the layers' matmul parameters per prompt token, causal attention at
        flash-attn's 2·h·s²·d per layer, and one lm_head row per sequence. The shared prefix counts
        once: its own tokens and attention once, then each prompt's suffix attending over it
        (n² − P² of a prompt of n tokens after a prefix of P).
    kv_token_bytes, matmul_flops_per_token, attention_flops_per_pair: the rates behind those terms
        (one token's K and V over all layers; 2 x the layers' matmul parameters; 4·h·d a scored
        (query, key) pair over all layers), which step_floors applies to the steps that ran.
    """
    p = preset
    elem = torch.finfo(dtype).bits // 8
    q, kv = p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim
    layer_matmul = p.hidden * (q + 2 * kv) + q * p.hidden + 3 * p.hidden * p.ffn
    layer_norms = 2 * p.hidden + 2 * p.head_dim  # input and post-attention norms, q and k norms
    weight_bytes = elem * (p.layers * (layer_matmul + layer_norms) + p.hidden + p.vocab * p.hidden)
    kv_per_token = kv_token_bytes(p, dtype)
    prefix = shared_prefix
    own_context = sum((o - 1) * (pl - prefix) + (o - 1) * o // 2 for pl, o in zip(prompt_lens, output_lens, strict=True))
    decoded_context = own_context + prefix * (max(output_lens) - 1)
    prefill_flops = (
        2 * p.layers * layer_matmul * (prefix + sum(n - prefix for n in prompt_lens))
        + 2 * p.layers * p.num_heads * p.head_dim * (prefix * prefix + sum(n * n - prefix * prefix for n in prompt_lens))
        + 2 * p.vocab * p.hidden * len(prompt_lens)
    )
    return dict(
        weight_bytes=weight_bytes, decode_steps=max(output_lens) - 1, kv_bytes=kv_per_token * decoded_context, prefill_flops=prefill_flops,
        kv_token_bytes=kv_per_token, matmul_flops_per_token=2 * p.layers * layer_matmul, attention_flops_per_pair=4 * p.layers * p.num_heads * p.head_dim,
    )


def engine_floor_s(counts: dict, ceilings: dict, tp: int = 1) -> float:
    """The workload's roofline time: bytes that must be read over the measured read bandwidth
    (the weights once per decode step, plus every decoded token's KV context), plus the prefill's
    FLOPs over the measured matmul rate, on `tp` GPUs that share both evenly. Both byte terms
    are reads, so read_gbps bounds them as it bounds the decode suite, not copy_gbps, which a
    read-only step can beat. Decode FLOPs, the prefill's own bytes, the few bytes written per
    step and the ranks' all-reduce traffic are left out: each is a small fraction of its term on
    a GPU."""
    read = counts["decode_steps"] * counts["weight_bytes"] + counts["kv_bytes"]
    return (read / (ceilings[DECODE_CEILING] * 1e9) + counts["prefill_flops"] / (ceilings[PREFILL_CEILING] * 1e12)) / tp


def step_floors(steps: list[dict], counts: dict, ceilings: dict, shared_prefix: int = 0, tp: int = 1) -> None:
    """Give each row of an engine step summary (engine.step_profile.summarize) `floor_s`, the least
    time its steps could take as they were scheduled, and `pct_floor`, that over their total_s.
    A decode row reads the weights once a step and the K/V of its rows' contexts, the shared
    prefix once a step (every row's context holds it): bytes at the read ceiling. A prefill row
    computes its new tokens' matmuls and its attention pairs: FLOPs at the matmul ceiling (the
    lm_head rows and the bytes it reads left out). Summed, the rows' floors differ from the
    workload's floor by what the schedule chose: decode steps beyond the longest output's count,
    and decode rows riding in prefill steps, charged there by their FLOPs."""
    for row in steps:
        if row["phase"] == "decode":
            kv_tokens = row["context_tokens"] - shared_prefix * (row["rows"] - row["steps"])
            floor = (row["steps"] * counts["weight_bytes"] + kv_tokens * counts["kv_token_bytes"]) / (ceilings[DECODE_CEILING] * 1e9)
        else:
            flops = row["new_tokens"] * counts["matmul_flops_per_token"] + row["attention_pairs"] * counts["attention_flops_per_pair"]
            floor = flops / (ceilings[PREFILL_CEILING] * 1e12)
        row["floor_s"] = floor / tp
        row["pct_floor"] = 100 * row["floor_s"] / row["total_s"] if row["total_s"] else None


def record_engine(benchmark, ceilings: dict, *, impl: str, shard, dtype: torch.dtype, counts: dict, prompt_lens: list[int], output_lens: list[int], **settings) -> None:
    """Fill benchmark.extra_info for an engine run: the workload, its roofline, and from the
    median wall time tokens_per_s (output tokens over wall time, prefill included) and
    pct_roofline (the floor over the wall time; also pct_of_ceiling, the field the reports read).
    weight_read_ms is one decode step's weight reads at the read ceiling; with the engine's step
    summary in settings["steps"], one_row_step_ms is the median decode step of one sequence (issue
    26 asks for at most 2x weight_read_ms), and each of its rows gets its floor (step_floors)."""
    info = benchmark.extra_info
    _configuration(info, "engine", impl, shard, dtype)
    info.update(num_seqs=len(prompt_lens))
    info.update(prompt_tokens=sum(prompt_lens), output_tokens=sum(output_lens), total_tokens=sum(prompt_lens) + sum(output_lens))
    if "steps" in settings:
        step_floors(settings["steps"], counts, ceilings, settings.get("shared_prefix", 0), shard.tp)
    info.update(counts, floor_s=engine_floor_s(counts, ceilings, shard.tp), **settings)
    info["weight_read_ms"] = 1e3 * counts["weight_bytes"] / (ceilings[DECODE_CEILING] * 1e9) / shard.tp
    one_row = [r for r in settings.get("steps", ()) if r["phase"] == "decode" and r["batch_up_to"] == 1]
    if one_row:
        info["one_row_step_ms"] = one_row[0]["median_total_ms"]
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    wall = benchmark.stats.stats.median
    info.update(wall_s=wall, tokens_per_s=sum(output_lens) / wall, ceiling="roofline")
    info["pct_roofline"] = info["pct_of_ceiling"] = 100 * info["floor_s"] / wall


def record_latency(benchmark, metrics: list) -> None:
    """Serving latencies of one engine run into extra_info, from each request's
    engine.request_metrics.RequestMetrics: ttft_ms and itl_ms as {"p50", "p90", "p99"} (time to
    first token per request; inter-token gaps pooled over every request), the preemptions, and
    prefix_hit_rate, the share of prompt tokens the prefix cache served."""
    info = benchmark.extra_info
    info["ttft_ms"] = _percentiles_ms([m.ttft_s for m in metrics])
    info["itl_ms"] = _percentiles_ms([gap for m in metrics for gap in m.itl_s])
    info["preemptions"] = sum(m.num_preemptions for m in metrics)
    info["prefix_hit_rate"] = sum(m.num_cached_tokens for m in metrics) / info["prompt_tokens"]


def _percentiles_ms(seconds: list[float]) -> dict[str, float]:
    return {q: 1e3 * v for q, v in percentiles(seconds).items()}
