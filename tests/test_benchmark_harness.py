"""The benchmark suites' own machinery: presets and their TP shards, FLOP/byte counts, the
ceilings and the % of them each benchmark records, and the correctness gate that keeps a wrong
implementation from ever being timed."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import ceilings
from benchmarks.extra_info import decode_counts, engine_counts, engine_floor_s, prefill_counts, prefix_counts, record
from benchmarks.presets import PRESETS, select, shard
from minivllm.kernels.launch import head_dim_block
from minivllm.kernels.naive_attention import NAIVE_MAX_SEQLEN
from minivllm.reference import attention_ref, paged_decode_gather
from minivllm.reference.decode_check import check_decode
from minivllm.reference.inputs import cu_seqlens, generator, paged_cache, randn
from minivllm.reference.prefill_check import check_prefill

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_grid_has_a_prefill_shape_the_naive_kernel_runs():
    """naive_triton holds a whole sequence in one tile; unless the GPU grid (collected here on the
    CPU, as a Slurm login node does) has a seqlen at its limit, no card's baseline compares it."""
    env = os.environ | {"MINIVLLM_BENCH_GRID": "gpu"}
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_prefill.py", "--collect-only", "-q", "-p", "no:cacheprovider"]
    ids = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    runs = [(model, int(seqlen)) for model, seqlen in re.findall(r"\[([\w.-]+?)-tp\d+-\w+-(\d+)-(?:full|causal)-naive_triton\]", ids)]
    assert runs and all(any(s <= NAIVE_MAX_SEQLEN[head_dim_block(PRESETS[m].head_dim)] for n, s in runs if n == m) for m, _ in runs), runs


@pytest.mark.parametrize(
    "model, tp, heads, kv_heads",
    [
        ("qwen3-235b-a22b", 4, 16, 1),  # 64/4: kv heads split exactly
        ("qwen3-235b-a22b", 8, 8, 1),  # 4 kv heads over 8 GPUs: each GPU holds a replica
        ("llama-3.1-405b", 8, 16, 1),
        ("llama-3.1-405b", 16, 8, 1),
        ("qwen3-8b", 1, 32, 8),
        ("qwen3-8b", 2, 16, 4),
    ],
)
def test_shard_splits_q_heads_and_splits_or_replicates_kv_heads(model, tp, heads, kv_heads):
    s = shard(PRESETS[model], tp)
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (heads, kv_heads, 128)
    assert s.id == f"{model}-tp{tp}"


@pytest.mark.parametrize("model, tp, match", [("qwen3-14b", 16, "qwen3-14b: .* 40 query heads"), ("qwen3-8b", 0, "positive"), ("qwen3-8b", 3, "32 query heads")])
def test_shard_refuses_a_tp_that_does_not_divide(model, tp, match):
    with pytest.raises(ValueError, match=match):
        shard(PRESETS[model], tp)


def test_select_defaults_all_and_unknown_names():
    gpu, _ = select([], [1], on_gpu=True)
    cpu, _ = select([], [1], on_gpu=False)
    assert len(gpu) >= 3 and all(s.head_dim == 128 for s in gpu)
    assert [s.model for s in cpu] == ["tiny"]
    every, notes = select(["all"], [1, 16], on_gpu=True)
    assert {s.model for s in every} == set(PRESETS) - {"tiny"}
    assert any("qwen3-14b" in n for n in notes)  # 40 heads cannot split 16 ways: left out, said so
    with pytest.raises(ValueError, match="unknown"):
        select(["qwen3-9b"], [1], on_gpu=True)
    with pytest.raises(ValueError, match="40 query heads"):
        select(["qwen3-14b"], [16], on_gpu=True)  # named explicitly: an error, not a silent gap


def test_counts_follow_flash_attn_convention():
    flops, nbytes = prefill_counts(2, 1024, 32, 8, 128, causal=False, dtype=torch.bfloat16)
    assert flops == 4 * 2 * 32 * 1024**2 * 128
    assert nbytes == 2 * 2 * 1024 * 128 * (32 + 32 + 8 + 8)
    assert prefill_counts(2, 1024, 32, 8, 128, causal=True, dtype=torch.bfloat16)[0] == flops // 2
    flops, nbytes = decode_counts(4, 4096, 32, 8, 128, dtype=torch.float16)
    assert flops == 4 * 4 * 32 * 4096 * 128
    assert nbytes == 2 * 4 * 128 * (2 * 4096 * 8 + 2 * 32)


@pytest.mark.parametrize("causal", [False, True])
def test_prefill_gate_passes_the_reference_and_fails_a_wrong_output(causal):
    gen = generator(1, torch.device("cpu"))
    batch, seqlen = 2, 150  # longer than the checked windows, so both ends are sampled
    q = randn((batch * seqlen, 4, 24), torch.float16, "cpu", gen)
    k, v = (randn((batch * seqlen, 2, 24), torch.float16, "cpu", gen) for _ in range(2))
    cu = cu_seqlens([seqlen] * batch, "cpu")
    out = attention_ref(q, k, v, cu, cu, causal=causal)
    check_prefill(out, q, k, v, batch, seqlen, causal, "reference")
    wrong = out.clone()
    wrong[2 * seqlen - 1, 3] += 0.05  # one element of the last query row of the last sequence
    with pytest.raises(AssertionError, match="sequence 1"):
        check_prefill(wrong, q, k, v, batch, seqlen, causal, "wrong")
    with pytest.raises(AssertionError):
        check_prefill(attention_ref(q, k, v, cu, cu, causal=not causal), q, k, v, batch, seqlen, causal, "wrong mask")


def test_decode_gate_passes_the_reference_and_fails_a_wrong_output():
    gen = generator(2, torch.device("cpu"))
    batch, ctx = 5, 37
    q = randn((batch, 4, 24), torch.bfloat16, "cpu", gen)
    cache = paged_cache([ctx] * batch, 16, 2, 24, torch.bfloat16, "cpu", gen)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    out = paged_decode_gather(q, cache.k_cache, cache.v_cache, cache.block_table, lens)
    check_decode(out, q, cache, lens, "reference")
    wrong = out.clone()
    wrong[batch // 2] = wrong[batch // 2].flip(0)  # the middle sequence's heads swapped
    with pytest.raises(AssertionError, match="wrong"):
        check_decode(wrong, q, cache, lens, "wrong")


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_counts_reduce_to_prefill_without_a_prefix(causal):
    assert prefix_counts(3, 0, 1024, 32, 8, 128, causal, torch.bfloat16) == prefill_counts(3, 1024, 32, 8, 128, causal, torch.bfloat16)
    # 2k cached + 2k new: each new token scores the 2k prefix plus on average half the new ones.
    flops, nbytes = prefix_counts(1, 2048, 2048, 32, 8, 128, causal, torch.bfloat16)
    assert flops == 4 * 32 * 2048 * (2048 + (1024 if causal else 2048)) * 128
    assert nbytes == 2 * 128 * (2 * 2048 * 32 + 2 * 4096 * 8)


@pytest.mark.parametrize("tied", [False, True])
def test_engine_counts_weights_match_a_real_checkpoint_and_kv_sums_contexts(tmp_path, tied):
    """Weight bytes per decode step equal the parameters transformers builds for the preset's
    shape (less the embedding when an untied lm_head is what a step reads); the KV term sums
    each decoded token's context; the floor adds the bytes' time at the read ceiling to the
    FLOPs' at the matmul ceiling."""
    from dataclasses import replace

    from minivllm.testing.random_checkpoint import write_random_qwen3
    from minivllm.testing.transformers_reference import load_transformers_model

    p = replace(PRESETS["tiny"], tied=tied)
    path = write_random_qwen3(
        tmp_path, num_layers=p.layers, hidden_size=p.hidden, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads,
        head_dim=p.head_dim, intermediate_size=p.ffn, vocab_size=p.vocab, tie_word_embeddings=tied, with_tokenizer=False,
    )
    model = load_transformers_model(path)
    params = sum(t.numel() for t in model.parameters()) - (0 if tied else p.vocab * p.hidden)
    counts = engine_counts(p, [2, 5], [3, 1], torch.bfloat16)
    assert counts["weight_bytes"] == 2 * params
    assert counts["decode_steps"] == 2
    # The first sequence decodes two tokens over contexts of 3 and 4; the second decodes none.
    assert counts["kv_bytes"] == (3 + 4) * 2 * 2 * p.layers * p.num_kv_heads * p.head_dim
    # Prompts of 4 and 5 tokens, outputs of 3 and 2, by hand. Alone, each decoded token reads its
    # context: 5 and 6 for the first sequence, 6 for the second (17). With the first 2 tokens a
    # shared prefix, each step reads them once: step 1 reads 2 + (5 - 2) + (6 - 2) = 9 tokens,
    # step 2 reads 2 + (6 - 2) = 6.
    shared = engine_counts(p, [4, 5], [3, 2], torch.bfloat16, shared_prefix=2)
    assert shared["kv_bytes"] == (9 + 6) * 2 * 2 * p.layers * p.num_kv_heads * p.head_dim
    assert engine_counts(p, [4, 5], [3, 2], torch.bfloat16)["kv_bytes"] == (5 + 6 + 6) * 2 * 2 * p.layers * p.num_kv_heads * p.head_dim
    # The bytes are all reads: the floor takes them at read_gbps, not at the copy rate.
    floor = engine_floor_s(counts, {"copy_gbps": 1000.0, "read_gbps": 1.0, "matmul_tflops": 1.0})
    assert floor == pytest.approx((2 * counts["weight_bytes"] + counts["kv_bytes"]) / 1e9 + counts["prefill_flops"] / 1e12)


def test_step_floors_by_hand():
    """A decode row of 2 steps over 5 sequences that read 40 context tokens, 3 of each sequence's
    a shared prefix: the weights twice and 40 - 3·(5 - 2) = 31 tokens of K/V, at the read ceiling.
    A prefill row of 10 new tokens scoring 55 pairs: their FLOPs at the matmul ceiling. Two GPUs
    halve both."""
    from benchmarks.extra_info import step_floors

    p = PRESETS["tiny"]
    counts = engine_counts(p, [4], [2], torch.bfloat16)
    assert counts["kv_token_bytes"] == 2 * 2 * p.layers * p.num_kv_heads * p.head_dim
    assert counts["attention_flops_per_pair"] == 4 * p.layers * p.num_heads * p.head_dim
    # One prompt alone: its matmuls and its causal attention, as the workload's prefill counts them,
    # less the lm_head row.
    lm_head = 2 * p.vocab * p.hidden
    assert counts["matmul_flops_per_token"] * 4 + counts["attention_flops_per_pair"] * 4 * 4 // 2 == counts["prefill_flops"] - lm_head
    machine = {"copy_gbps": 1000.0, "read_gbps": 2.0, "matmul_tflops": 3.0}
    for tp in (1, 2):
        steps = [dict(phase="decode", steps=2, rows=5, new_tokens=5, context_tokens=40, attention_pairs=40, total_s=4.0),
                 dict(phase="prefill", steps=1, rows=2, new_tokens=10, context_tokens=10, attention_pairs=55, total_s=0.0)]
        step_floors(steps, counts, machine, shared_prefix=3, tp=tp)
        decode = (2 * counts["weight_bytes"] + 31 * counts["kv_token_bytes"]) / 2e9 / tp
        prefill = (10 * counts["matmul_flops_per_token"] + 55 * counts["attention_flops_per_pair"]) / 3e12 / tp
        assert steps[0]["floor_s"] == pytest.approx(decode) and steps[0]["pct_floor"] == pytest.approx(100 * decode / 4.0)
        assert steps[1]["floor_s"] == pytest.approx(prefill) and steps[1]["pct_floor"] is None


def recorded(suite: str, median: float, machine: dict) -> dict:
    """The extra_info `record` writes for a benchmark of `suite` whose median is `median`
    seconds, on a machine of ceilings `machine`; 1 GFLOP and 1 GB of work."""
    bench = SimpleNamespace(extra_info={}, stats=SimpleNamespace(stats=SimpleNamespace(median=median)))
    s = shard(PRESETS["tiny"], 1)
    record(bench, machine, suite=suite, impl="x", shard=s, dtype=torch.bfloat16, flops=10**9, nbytes=10**9, batch=1)
    return bench.extra_info


def test_decode_pct_is_of_the_read_ceiling_and_prefill_of_matmul():
    machine = {"copy_gbps": 3000.0, "read_gbps": 4000.0, "matmul_tflops": 800.0}
    decode = recorded("decode", 1e-3 / 3.6, machine)  # 3600 GB/s: past the copy rate, 90% of reading
    assert decode["ceiling"] == "read_gbps" and decode["gbps"] == pytest.approx(3600.0)
    assert decode["pct_of_ceiling"] == pytest.approx(90.0)
    prefill = recorded("prefill", 1 / 400e3, machine)  # 400 TFLOP/s
    assert prefill["ceiling"] == "matmul_tflops" and prefill["pct_of_ceiling"] == pytest.approx(50.0)


def test_engine_record_gives_the_one_row_step_against_the_weights_read_time():
    """weight_read_ms is one step's weight bytes at the read ceiling (per GPU); one_row_step_ms is
    the step summary's one-sequence decode median, absent when no step decoded one sequence."""
    from benchmarks.extra_info import record_engine

    counts = dict(weight_bytes=3 * 10**9, decode_steps=2, kv_bytes=0, prefill_flops=0, kv_token_bytes=0, matmul_flops_per_token=0, attention_flops_per_pair=0)
    machine = {"copy_gbps": 1000.0, "read_gbps": 2000.0, "matmul_tflops": 1.0}
    work = dict(steps=1, rows=1, new_tokens=1, context_tokens=1, attention_pairs=1, total_s=1.0)
    steps = [dict(work, phase="prefill", batch_up_to=4, median_total_ms=9.0), dict(work, phase="decode", batch_up_to=1, median_total_ms=2.5),
             dict(work, phase="decode", batch_up_to=2, median_total_ms=3.0)]
    infos = []
    for tp, s in ((1, steps), (2, steps), (1, steps[::2])):
        bench = SimpleNamespace(extra_info={}, stats=SimpleNamespace(stats=SimpleNamespace(median=1.0)))
        record_engine(bench, machine, impl="minivllm", shard=shard(PRESETS["tiny"], tp), dtype=torch.bfloat16, counts=counts,
                      prompt_lens=[3], output_lens=[3], steps=s)
        infos.append(bench.extra_info)
    assert [i["weight_read_ms"] for i in infos] == pytest.approx([1.5, 0.75, 1.5])
    assert infos[0]["one_row_step_ms"] == 2.5 and "one_row_step_ms" not in infos[2]


def test_read_kernel_sums_each_programs_chunk(device):
    """The streaming kernel (interpreted on the CPU, compiled on a GPU) reads every float of its
    chunk once: each partial is its chunk's sum."""
    block, steps, programs = 16, 3, 4
    src = torch.arange(programs * block * steps, dtype=torch.float32, device=device)
    partial = torch.empty(programs, device=device)
    ceilings.read_kernel[(programs,)](src, partial, BLOCK=block, STEPS=steps)
    torch.testing.assert_close(partial, src.view(programs, -1).sum(1))


def test_read_ceiling_on_the_cpu_uses_torch_alone():
    assert set(ceilings.read_methods(torch.zeros(1 << 16))) == {"torch.sum", "torch.amax"}
    gbps, method = ceilings.fastest_read(torch.device("cpu"), 4 << 20, reps=3)
    assert gbps > 0 and method in ("torch.sum", "torch.amax")


@pytest.mark.gpu
def test_read_ceiling_on_a_gpu_tries_the_streaming_kernel_and_beats_the_copy():
    device = torch.device("cuda")
    src = ceilings.random_buffer(device, 1 << 20, 3)
    methods = ceilings.read_methods(src)
    assert len(methods) == 2 + len(ceilings.READ_TILES)
    for name, launch in methods.items():
        if name.startswith("triton"):
            launch()
            partials = launch.args[1]  # the kernel's (src, partial) arguments
            assert partials.double().sum().item() == pytest.approx(src.double().sum().item(), abs=1e-5 * src.abs().sum().item())
    facts = ceilings.ceilings(device)
    # A copy counts read and written bytes, each at about the read rate; reading alone is no slower.
    assert facts["read_gbps"] > 0.95 * facts["copy_gbps"]
