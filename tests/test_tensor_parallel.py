"""Tensor parallelism: two ranks, over gloo on the CPU or NCCL on two GPUs (with decode CUDA
graphs holding the all-reduces), spawned by the engine or started by torchrun, must generate
exactly what one rank and transformers do (float32, greedy), with GQA heads split and an MQA kv
head replicated, through prefix-cache hits and preemption; a failing or killed worker must be
reported to the caller and leave no process behind."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import SamplingParams
from engine.loader import load_model_args, load_weights
from engine.parallel import TPGroup
from engine.qwen3 import Qwen3ForCausalLM
from engine.random_checkpoint import write_random_qwen3
from tests.engine_cases import CONFIGS, GREEDY, PROMPT_LENS, engine, prompts, transformers_greedy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["gqa-d32", "mqa-d64-tied"])
def checkpoint(request, tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp(request.param), with_tokenizer=False, seed=7, **CONFIGS[request.param])


def skip_without_two_gpus(device):
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("two ranks on a GPU machine need two GPUs")


@pytest.fixture
def tp2(checkpoint, device):
    """A factory of two-rank engines over `checkpoint`, each closed after the test."""
    skip_without_two_gpus(device)
    made = []

    def make(backend="triton", **config):
        llm = engine(checkpoint, backend, tensor_parallel_size=2, **config)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()
    assert not multiprocessing.active_children(), "a worker outlived its LLM"


def test_two_ranks_equal_one_rank_and_transformers(checkpoint, tp2, device):
    batch = prompts(PROMPT_LENS)
    one = [o["token_ids"] for o in engine(checkpoint, "triton").generate(batch, GREEDY, use_tqdm=False)]
    llm = tp2(num_kvcache_blocks=-1)  # each rank sizes its cache; the ranks agree on the smallest
    assert llm.config.num_kvcache_blocks > 0 and llm.model.num_kv_heads == (1 if "mqa" in checkpoint.name else CONFIGS["gqa-d32"]["num_kv_heads"] // 2)
    two = [o["token_ids"] for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    hf = transformers_greedy(checkpoint, device)
    assert two == one == [hf(p, GREEDY.max_tokens) for p in batch]


def test_prefix_cache_and_preemption_hold_on_two_ranks(checkpoint, tp2, device):
    hf = transformers_greedy(checkpoint, device)
    shared = prompts([40], seed=1)[0]
    first, second = (shared + tail for tail in prompts([3, 9], seed=2))
    llm = tp2("torch")
    llm.generate([first], GREEDY, use_tqdm=False)
    out = llm.generate([second, first], GREEDY, use_tqdm=False)
    assert llm.scheduler.block_manager.num_cache_hit_blocks >= 2 * (40 // 16)
    assert [o["token_ids"] for o in out] == [hf(second, GREEDY.max_tokens), hf(first, GREEDY.max_tokens)]
    with pytest.raises(RuntimeError, match="another tensor-parallel LLM is open"):
        tp2("torch")
    llm.close()

    small = tp2("torch", num_kvcache_blocks=6)
    batch = prompts([20, 23, 26], seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    out = small.generate(batch, params, use_tqdm=False)
    assert small.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in out] == [hf(p, params.max_tokens) for p in batch]


class BreaksInWorkers(SamplingParams):
    """Sampling parameters that unpickle everywhere but in a spawned worker."""

    def __setstate__(self, state):
        if multiprocessing.parent_process() is not None:
            raise RuntimeError("boom: these sampling parameters cannot be read on this rank")
        self.__dict__.update(state)


def test_a_failing_worker_surfaces_its_error_and_leaves_no_process(checkpoint, tp2):
    """The worker fails after rank 0 has moved on into the step's collectives: gloo notices the
    closed peer; over NCCL rank 0's polling wait (TPGroup.wait) notices the stopped worker."""
    llm = tp2("torch")
    workers = [p for p in multiprocessing.active_children()]
    assert len(workers) == 1
    with pytest.raises(RuntimeError, match=r"(?s)tensor-parallel worker 1 failed:.*boom: these sampling parameters"):
        llm.generate(prompts([5]), BreaksInWorkers(temperature=0, max_tokens=3), use_tqdm=False)
    workers[0].join(10)
    assert not workers[0].is_alive()
    with pytest.raises(RuntimeError, match="this LLM was closed"):
        llm.generate(prompts([5]), GREEDY, use_tqdm=False)


def test_a_killed_worker_is_noticed_and_reported(checkpoint, tp2):
    """A worker killed outright sends no report: Workers.check sees it gone, and the next generate
    raises rank 0's own error, stops the group and leaves no process."""
    llm = tp2("torch")
    worker = multiprocessing.active_children()[0]
    llm.workers.check()
    worker.kill()
    worker.join(10)
    with pytest.raises(RuntimeError, match="worker stopped"):
        llm.workers.check()
    with pytest.raises(RuntimeError, match="tensor parallelism failed on rank 0"):
        llm.generate(prompts([5]), GREEDY, use_tqdm=False)
    assert not multiprocessing.active_children()


def test_unshardable_heads_are_refused_before_any_process_starts(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the 4 query heads"):
        engine(checkpoint, "torch", tensor_parallel_size=3, device="cpu")  # on the CPU whatever the GPU count
    assert not multiprocessing.active_children()


def test_torchrun_ranks_join_the_launchers_group(checkpoint, tmp_path, device):
    skip_without_two_gpus(device)
    out = tmp_path / "tokens.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "tp_launched.py"), str(checkpoint), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    one = [o["token_ids"] for o in engine(checkpoint, "triton").generate(prompts(PROMPT_LENS), GREEDY, use_tqdm=False)]
    assert result == dict(world=2, tokens=one)


def test_a_rank_loads_only_its_slices(checkpoint):
    """Rank 1 of 2 holds the second half of q heads, its kv heads, FFN columns and vocabulary rows,
    copied from exactly those rows or columns of the checkpoint; nothing else is materialised."""
    args = load_model_args(checkpoint)
    tp = TPGroup(1, 2)
    model = Qwen3ForCausalLM(args, "torch", tp)
    load_weights(model, checkpoint)
    full = {k.removeprefix("model."): v for f in checkpoint.glob("*.safetensors") for k, v in load_file(f).items()}
    d = args.head_dim
    q, kv = tp.q_heads(args.num_heads, args.num_kv_heads), tp.kv_heads(args.num_heads, args.num_kv_heads)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    wq, wk, wv = attn.qkv_proj.weight.split(attn.split)
    assert torch.equal(wq, full["layers.0.self_attn.q_proj.weight"][q.start * d : q.stop * d])
    assert torch.equal(wk, full["layers.0.self_attn.k_proj.weight"][kv.start * d : kv.stop * d])
    assert torch.equal(wv, full["layers.0.self_attn.v_proj.weight"][kv.start * d : kv.stop * d])
    assert torch.equal(attn.o_proj.weight, full["layers.0.self_attn.o_proj.weight"][:, q.start * d : q.stop * d])
    cols = tp.split(args.intermediate_size, "FFN columns")
    gate, up = mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, full["layers.0.mlp.gate_proj.weight"][cols.start : cols.stop])
    assert torch.equal(up, full["layers.0.mlp.up_proj.weight"][cols.start : cols.stop])
    assert torch.equal(mlp.down_proj.weight, full["layers.0.mlp.down_proj.weight"][:, cols.start : cols.stop])
    rows = tp.vocab(args.vocab_size)
    assert torch.equal(model.embed_tokens.weight[: len(rows)], full["embed_tokens.weight"][rows.start : rows.stop])
    held = sum(p.numel() for p in model.parameters())
    assert held < 0.6 * sum(t.numel() for name, t in full.items() if not (args.tie_word_embeddings and name == "lm_head.weight"))
