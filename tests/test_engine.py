"""The engine end to end against transformers' own Qwen3, on tiny random checkpoints.

Greedy generation with ignore_eos must equal transformers' generate(do_sample=False) token for
token, for both attention backends, across GQA/MQA/MHA, head_dim 32/64/128 and tied/untied
embeddings, and still when prefixes are shared (cache hits, decoded by cascade attention), the cache is too small for every
request at once (preemption), or prompts are several times the step's token budget (chunked
prefill, decodes riding along). Async scheduling must give the tokens of synchronous scheduling,
greedy and seeded, and every request's metrics must be present and ordered. float32 throughout,
where exact equality holds.
"""

import dataclasses

import pytest
import torch

from minivllm.engine import LLM, SamplingParams, model_runner
from minivllm.testing.random_checkpoint import write_random_qwen3
from minivllm.testing.transformers_reference import load_transformers_model
from tests.engine_cases import BLOCK, CONFIGS, GREEDY, PROMPT_LENS, engine, prompts, transformers_greedy


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp(request.param), with_tokenizer=False, seed=7, **CONFIGS[request.param])


@pytest.fixture(scope="module")
def hf_greedy(checkpoint, device):
    return transformers_greedy(checkpoint, device)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_greedy_equals_transformers(checkpoint, hf_greedy, backend):
    batch = prompts(PROMPT_LENS)
    llm = engine(checkpoint, backend)
    out = llm.generate(batch, GREEDY, use_tqdm=False)
    for prompt, o in zip(batch, out, strict=True):
        assert len(set(o["token_ids"])) > 1, "the random model must not collapse to one repeated token"
        assert o["token_ids"] == hf_greedy(prompt, GREEDY.max_tokens)
        assert o["text"] is None  # no tokenizer in this checkpoint


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shared_prefix_hits_the_cache_and_changes_nothing(checkpoint, hf_greedy, backend, monkeypatch):
    shared = prompts([40], seed=1)[0]  # two full blocks and a partial one
    tails = prompts([3, 9], seed=2)
    first, second = shared + tails[0], shared + tails[1]
    # Cascade attention from two rows sharing one block (the device's own config waits for more),
    # set before the engine captures its decode graphs.
    real = model_runner.cascade_config
    monkeypatch.setattr(model_runner, "cascade_config", lambda *args: dataclasses.replace(real(*args), min_rows=2, min_shared=1))
    llm = engine(checkpoint, backend)
    out_first = llm.generate([first], GREEDY, use_tqdm=False)
    assert llm.scheduler.block_manager.num_cache_hit_blocks == 0
    # The second request finds the first's freed but still cached blocks.
    out_second = llm.generate([second, first], GREEDY, use_tqdm=False)
    assert llm.scheduler.block_manager.num_cache_hit_blocks >= 2 * (40 // BLOCK)
    # Both rows share those blocks while they decode, so these tokens came through cascade attention.
    assert llm.runner.cascade_steps > 0
    assert out_first[0]["token_ids"] == out_second[1]["token_ids"] == hf_greedy(first, GREEDY.max_tokens)
    assert out_second[0]["token_ids"] == hf_greedy(second, GREEDY.max_tokens)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_preemption_when_the_cache_is_too_small_changes_nothing(checkpoint, hf_greedy, backend):
    batch = prompts([20, 23, 26], seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    # 6 blocks of 16 hold one 96-token sequence but not three ~50-token ones.
    llm = engine(checkpoint, backend, num_kvcache_blocks=6)
    out = llm.generate(batch, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for prompt, o in zip(batch, out, strict=True):
        assert o["token_ids"] == hf_greedy(prompt, params.max_tokens)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_prompts_longer_than_the_token_budget_are_prefilled_in_chunks(checkpoint, hf_greedy, backend):
    """A 16-token budget: the 70- and 51-token prompts take several steps each, beside the short
    ones' decodes. Then, in a cache of 6 blocks, the 14-token prompt's decode needs a second block
    while the 75-token one, holding the other five, is part way through its prefill: that one is
    preempted and recomputed."""
    batch = prompts([70, 5, 51, 17], seed=4)
    llm = engine(checkpoint, backend, max_num_batched_tokens=16)
    out = llm.generate(batch, GREEDY, use_tqdm=False)
    assert any(r.prefill and r.batch > 1 and r.new_tokens == 16 for r in llm.step_records), "no step mixed chunks and decodes"
    for prompt, o in zip(batch, out, strict=True):
        assert o["token_ids"] == hf_greedy(prompt, GREEDY.max_tokens)
    batch = prompts([14, 75], seed=5)
    small = engine(checkpoint, backend, max_num_batched_tokens=16, num_kvcache_blocks=6)
    out = small.generate(batch, GREEDY, use_tqdm=False)
    assert [o["metrics"].num_preemptions for o in out] == [0, 1]
    for prompt, o in zip(batch, out, strict=True):
        assert o["token_ids"] == hf_greedy(prompt, GREEDY.max_tokens)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_async_scheduling_gives_the_tokens_of_sync_scheduling(checkpoint, backend):
    """Greedy, and seeded sampling with the global seed reset before each run: with the same steps
    the sampler draws the same noise. EOS is honoured (async schedules one step past it and drops
    that token), so a mid-run EOS is included."""
    batch = prompts([5, 16, 17, 33, 40], seed=5)
    runs = {}
    for async_scheduling in (False, True):
        llm = engine(checkpoint, backend, async_scheduling=async_scheduling)
        greedy = [o["token_ids"] for o in llm.generate(batch, GREEDY, use_tqdm=False)]
        eos = greedy[2][3]
        llm.eos_token_ids = {eos}
        stopped = [o["token_ids"] for o in llm.generate(batch, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)]
        llm.eos_token_ids = set()
        torch.manual_seed(11)
        sampled = [o["token_ids"] for o in llm.generate(batch, SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True), use_tqdm=False)]
        runs[async_scheduling] = (greedy, stopped, sampled)
        assert stopped[2] == greedy[2][: greedy[2].index(eos) + 1] and all(eos not in t[:-1] for t in stopped)
    assert runs[True] == runs[False]
    assert runs[True][2] != runs[True][0], "sampling at temperature 0.8 drew the greedy tokens"


def test_requests_carry_ordered_metrics(checkpoint):
    shared = prompts([40], seed=6)[0]
    llm = engine(checkpoint, "torch", num_kvcache_blocks=7, max_num_batched_tokens=32)
    llm.generate([shared], GREEDY, use_tqdm=False)
    out = llm.generate([shared + [1, 2], *prompts([30, 9], seed=7)], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for o in out:
        m = o["metrics"]
        assert len(m.token_times_s) == len(o["token_ids"]) == 20
        assert m.arrival_s <= m.token_times_s[0] and m.token_times_s == sorted(m.token_times_s)
        assert m.ttft_s == m.token_times_s[0] - m.arrival_s and len(m.itl_s) == 19 and min(m.itl_s) >= 0
    assert out[0]["metrics"].num_cached_tokens == 32  # two full blocks of the earlier request's prompt
    assert sum(o["metrics"].num_preemptions for o in out) == llm.scheduler.num_preemptions > 0


@pytest.mark.gpu
def test_bf16_on_gpu_tracks_transformers(checkpoint, capsys):
    """bf16 cannot be token-exact against another implementation: the first step's logits must be
    as close to float32 transformers as transformers' own bf16 run is (flash-attn's 2x rule), and
    the greedy agreement is reported. The cache is sized from free memory and decode runs as CUDA
    graphs."""
    from minivllm.engine.scheduler import ScheduledStep
    from minivllm.engine.sequence import Sequence

    batch = prompts(PROMPT_LENS)
    llm = LLM(str(checkpoint), dtype="bfloat16", kvcache_block_size=BLOCK, max_model_len=96, max_num_batched_tokens=256, gpu_memory_utilization=0.5)
    assert llm.runner.graphs, "decode CUDA graphs were not captured"
    seqs, step = [Sequence(p, GREEDY, BLOCK) for p in batch], ScheduledStep()
    for seq in seqs:
        llm.scheduler.block_manager.allocate(seq)
        step.add(seq, len(seq))
    ids, positions, meta, last = llm.runner.prepare_chunks(step)
    with torch.inference_mode():
        ours = llm.model.compute_logits(llm.model(ids, positions, llm.runner.kv_caches, meta)[last])
    for seq in seqs:
        llm.scheduler.block_manager.deallocate(seq)

    def hf_last_logits(dtype):
        model = load_transformers_model(checkpoint, dtype=dtype, device="cuda")
        with torch.no_grad():
            return torch.stack([model(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in batch])

    ref32, ref16 = hf_last_logits(torch.float32), hf_last_logits(torch.bfloat16)
    err, ref_err = (ours - ref32).abs().max().item(), (ref16 - ref32).abs().max().item()
    assert err <= 2 * ref_err + 1e-2, f"bf16 logits off by {err:.3g}; transformers' own bf16 is off by {ref_err:.3g}"

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = llm.generate(batch, params, use_tqdm=False)
    model16 = load_transformers_model(checkpoint, dtype=torch.bfloat16, device="cuda")
    agree = []
    for prompt, o in zip(batch, out, strict=True):
        with torch.no_grad():
            hf = model16.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=32, min_new_tokens=32)
        hf = hf[0, len(prompt) :].tolist()
        agree.append(next((i for i, (a, b) in enumerate(zip(o["token_ids"], hf, strict=True)) if a != b), len(hf)))
    with capsys.disabled():
        print(f"\nbf16 {checkpoint.name}: logits max err {err:.3g} (transformers bf16 {ref_err:.3g}); greedy tokens agreeing before the first difference: {agree} of 32")
    assert agree[0] >= 1
