"""The engine end to end against transformers' own Qwen3, on tiny random checkpoints.

Greedy generation with ignore_eos must equal transformers' generate(do_sample=False) token for
token, for both attention backends, across GQA/MQA/MHA, head_dim 32/64/128 and tied/untied
embeddings, and still when prefixes are shared (cache hits) or the cache is too small for every
request at once (preemption). float32 throughout, where exact equality holds.
"""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.random_checkpoint import write_random_qwen3
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
def test_shared_prefix_hits_the_cache_and_changes_nothing(checkpoint, hf_greedy, backend):
    shared = prompts([40], seed=1)[0]  # two full blocks and a partial one
    tails = prompts([3, 9], seed=2)
    first, second = shared + tails[0], shared + tails[1]
    llm = engine(checkpoint, backend)
    out_first = llm.generate([first], GREEDY, use_tqdm=False)
    assert llm.scheduler.block_manager.num_cache_hit_blocks == 0
    # The second request finds the first's freed but still cached blocks.
    out_second = llm.generate([second, first], GREEDY, use_tqdm=False)
    assert llm.scheduler.block_manager.num_cache_hit_blocks >= 2 * (40 // BLOCK)
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


@pytest.mark.gpu
def test_bf16_on_gpu_tracks_transformers(checkpoint, capsys):
    """bf16 cannot be token-exact against another implementation: the first step's logits must be
    as close to float32 transformers as transformers' own bf16 run is (flash-attn's 2x rule), and
    the greedy agreement is reported. The cache is sized from free memory and decode runs as CUDA
    graphs."""
    from transformers import AutoModelForCausalLM

    from engine.sequence import Sequence

    batch = prompts(PROMPT_LENS)
    llm = LLM(str(checkpoint), dtype="bfloat16", kvcache_block_size=BLOCK, max_model_len=96, max_num_batched_tokens=256, gpu_memory_utilization=0.5)
    assert llm.runner.graphs, "decode CUDA graphs were not captured"
    seqs = [Sequence(p, GREEDY, BLOCK) for p in batch]
    for seq in seqs:
        llm.scheduler.block_manager.allocate(seq)
    ids, positions, meta, last = llm.runner.prepare_prefill(seqs)
    with torch.inference_mode():
        ours = llm.model.compute_logits(llm.model(ids, positions, llm.runner.kv_caches, meta)[last])
    for seq in seqs:
        llm.scheduler.block_manager.deallocate(seq)

    def hf_last_logits(dtype):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()
        with torch.no_grad():
            return torch.stack([model(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in batch])

    ref32, ref16 = hf_last_logits(torch.float32), hf_last_logits(torch.bfloat16)
    err, ref_err = (ours - ref32).abs().max().item(), (ref16 - ref32).abs().max().item()
    assert err <= 2 * ref_err + 1e-2, f"bf16 logits off by {err:.3g}; transformers' own bf16 is off by {ref_err:.3g}"

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = llm.generate(batch, params, use_tqdm=False)
    model16 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    agree = []
    for prompt, o in zip(batch, out, strict=True):
        with torch.no_grad():
            hf = model16.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=32, min_new_tokens=32)
        hf = hf[0, len(prompt) :].tolist()
        agree.append(next((i for i, (a, b) in enumerate(zip(o["token_ids"], hf, strict=True)) if a != b), len(hf)))
    with capsys.disabled():
        print(f"\nbf16 {checkpoint.name}: logits max err {err:.3g} (transformers bf16 {ref_err:.3g}); greedy tokens agreeing before the first difference: {agree} of 32")
    assert agree[0] >= 1
