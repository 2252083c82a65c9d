"""Engine throughput and serving latency end to end: the workloads of
benchmarks/engine_workloads.py (nano-vllm's benchmark, a shared system prompt, long contexts
prefilled in chunks) through our engine, and nano-vllm's also through transformers' `generate`,
on the same random weights in a real model's shapes.

Every workload is drawn with seed 0: prompts of random token ids, ignore_eos, temperature 0.6
and the workload's top-k and top-p (off but in qwen3_sampling). The model is a dense Qwen3 preset (default qwen3-0.6b on the GPU, `tiny`
on the CPU, `--preset` for others) written with seeded random weights by transformers'
save_pretrained, in the run's dtype (bf16 unless `--dtype` asks for others).

Each implementation runs the workload once, timed by the wall clock from the first prompt to the
last token (prefill included), after a warm-up run of a workload drawn the same way with two
output tokens, so JIT compilation, autotuning and CUDA graph capture stay out of the figure.
Every sequence must come back with exactly its requested number of tokens, each a valid id.

- minivllm: `LLM(...).generate` with one SamplingParams per sequence, over `--tp` GPUs.
- hf_transformers: `generate` in batches of `--hf-batch` sequences (default 64), grouped by
  requested output length so that a batch wastes little decoding past its shorter members,
  left-padded, with transformers' default dynamic KV cache and SDPA attention. A batch runs to
  its longest output; only the requested tokens count. One GPU: it runs only at --tp 1, and only
  the nano workload (it has no prefix cache, and pads long contexts to the batch's longest). On
  a GPU it runs only with --hf-peer: over the whole workload it takes about 2.5 minutes on an
  H100 (863 tok/s), a quarter of the default run's ten; a subset would not be the same figure.

extra_info (benchmarks/extra_info.py, record_engine) holds the workload, tokens_per_s, the token
totals, the workload's roofline time (engine_counts, engine_floor_s) and pct_roofline; for
minivllm also `steps`, the engine's step-time breakdown (minivllm/engine/step_profile.py, summarize),
`one_row_step_ms` (its median one-sequence decode step, against `weight_read_ms`), and
the serving latencies (record_latency): p50/p90/p99 of TTFT and of inter-token latency, the
preemptions and the prefix-cache hit rate; on a GPU also `allocator`, how often the timed run
made the caching allocator call cudaMalloc or cudaFree (allocator_counts).
"""

import gc
from functools import partial

import pytest
import torch

from benchmarks.engine_workloads import TEMPERATURE, WORKLOADS, Workload, check_outputs, write_checkpoint
from benchmarks.extra_info import engine_counts, record_engine, record_latency
from benchmarks.presets import PRESETS
from minivllm.dtypes import dtype_name
from minivllm.engine import LLM
from minivllm.engine.step_profile import summarize

IMPLS = ("minivllm", "hf_transformers")
DEFAULT_MODELS = ("qwen3-0.6b", "tiny")  # the suite's models when --preset names none: nano-vllm's, and the CPU smoke shape


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """A random-weight checkpoint per (preset, dtype), written on first use."""
    built = {}

    def get(preset, dtype: torch.dtype):
        key = (preset.name, dtype)
        if key not in built:
            built[key] = write_checkpoint(preset, dtype, tmp_path_factory.mktemp(preset.name))
        return built[key]

    return get


def run_hf(model, prompts: list[list[int]], output_lens: list[int], batch: int, workload: Workload) -> list[list[int]]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: output_lens[i])
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        new = max(output_lens[i] for i in rows)
        config = GenerationConfig(
            do_sample=True, temperature=TEMPERATURE, top_k=workload.top_k, top_p=workload.top_p, max_new_tokens=new, min_new_tokens=new,
            eos_token_id=None, pad_token_id=0,
        )
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for r, i in enumerate(rows):
            outputs[i] = generated[r, width : width + output_lens[i]].tolist()
    return outputs


# The caching allocator's counters of calls that hold the host until the device is idle
# (cudaFree, when a failed cudaMalloc makes it release its cache and retry, syncing every stream
# first) or can take milliseconds (cudaMalloc): a prefill step that spends its launch waiting on
# the device (benchmarks/NOTES.md, "Engine e4") would show here.
ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def allocator_counts(device: torch.device) -> dict[str, int]:
    """This process's allocator counters on `device` (ALLOCATOR_COUNTERS); empty off CUDA."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {name: int(stats.get(name, 0)) for name in ALLOCATOR_COUNTERS}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_engine(benchmark, request, capsys, device, ceiling, checkpoints, shard, dtype, workload: Workload, impl):
    preset = PRESETS[shard.model]
    if preset.ffn is None:
        pytest.skip(f"{preset.name}: the engine runs dense Qwen3 models only")
    if preset.name not in DEFAULT_MODELS and not request.config.getoption("preset"):
        pytest.skip(f"the engine suite runs {DEFAULT_MODELS[0]} unless --preset names others")
    if impl == "hf_transformers" and shard.tp != 1:
        pytest.skip("transformers' generate runs on one GPU: its row is the --tp 1 one")
    if impl == "hf_transformers" and device.type == "cuda" and not request.config.getoption("hf_peer"):
        pytest.skip("transformers' generate takes minutes on a GPU: --hf-peer asks for it")
    if impl == "hf_transformers" and workload.name != "nano":
        pytest.skip("transformers runs nano-vllm's workload only: it has no prefix cache and pads long contexts")
    if dtype != torch.bfloat16 and not request.config.getoption("dtype"):
        pytest.skip("the engine suite runs bf16 unless --dtype asks for more")
    path = checkpoints(preset, dtype)
    prompts, output_lens = workload.draw(0, preset.vocab)
    warm_prompts, _ = workload.draw(1, preset.vocab)
    settings = dict(
        workload=workload.name, shared_prefix=workload.shared_prefix, min_len=workload.prompt_lens[0], max_len=workload.prompt_lens[1],
        min_output=workload.output_lens[0], max_output=workload.output_lens[1],
    )
    # The engine of the row before sized its KV cache to most of the GPU: make sure it is gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if impl == "minivllm":
        llm = LLM(str(path), dtype=dtype, device=device, tensor_parallel_size=shard.tp, **workload.engine_settings())
        request.addfinalizer(llm.close)
        c = llm.config
        settings.update(
            block_size=c.kvcache_block_size, num_kvcache_blocks=c.num_kvcache_blocks, max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=c.max_model_len, async_scheduling=c.async_scheduling,
        )
        workload.generate(llm, warm_prompts, [2] * workload.num_seqs)
        fn = partial(workload.generate, llm, prompts, output_lens)
    else:
        from minivllm.testing.transformers_reference import load_transformers_model

        hf_batch = request.config.getoption("hf_batch")
        model = load_transformers_model(path, dtype=dtype, device=device, attn_implementation="sdpa")
        settings.update(hf_batch=hf_batch, hf_cache="dynamic")
        run_hf(model, warm_prompts[:hf_batch], [2] * min(hf_batch, workload.num_seqs), hf_batch, workload)
        fn = partial(run_hf, model, prompts, output_lens, hf_batch, workload)

    benchmark.group = f"engine {workload.name} {shard.id} {dtype_name(dtype)} {workload.num_seqs} seqs"
    before = allocator_counts(device)
    with torch.inference_mode():
        outputs = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    after = allocator_counts(device)
    if after:
        settings["allocator"] = {name: after[name] - before[name] for name in after}
    metrics = None
    if impl == "minivllm":
        settings["steps"] = summarize(llm.step_records)
        outputs, metrics = [o["token_ids"] for o in outputs], [o["metrics"] for o in outputs]
    check_outputs(outputs, output_lens, preset.vocab, impl)
    prompt_lens = [len(p) for p in prompts]
    counts = engine_counts(preset, prompt_lens, output_lens, dtype, workload.shared_prefix)
    record_engine(benchmark, ceiling, impl=impl, shard=shard, dtype=dtype, counts=counts, prompt_lens=prompt_lens, output_lens=output_lens, **settings)
    info = benchmark.extra_info
    if metrics is not None and "tokens_per_s" in info:
        record_latency(benchmark, metrics)
    if "tokens_per_s" in info:
        latency = f"; TTFT p50 {info['ttft_ms']['p50']:.0f} ms, ITL p50 {info['itl_ms']['p50']:.1f} ms" if "ttft_ms" in info else ""
        compiled = sum(row.get("compiles", 0) for row in info.get("steps") or ())
        latency += f"; {compiled} Triton compile(s) inside the timed run [jit]" if compiled else ""
        # Printed as each row ends, so a run cut short by a time limit still shows what it measured.
        with capsys.disabled():
            print(f"\n{request.node.name}: {info['tokens_per_s']:.0f} output tok/s, {info['wall_s']:.2f} s, "
                  f"{info['pct_roofline']:.1f}% of the {info['floor_s']:.2f} s roofline{latency}")
