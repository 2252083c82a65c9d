"""Tensor parallelism: two ranks, over gloo on the CPU or NCCL on two GPUs (with decode CUDA
graphs holding the all-reduces), spawned by the engine or started by torchrun, must generate
exactly what one rank and transformers do (float32, greedy), with GQA heads split and an MQA kv
head replicated, through prefix-cache hits and preemption; a failing or killed worker must be
reported to the caller, and every fault (an error or interrupt on rank 0, a script without the
`__main__` guard, exit without close(), a killed rank 0) must end within seconds and leave no
process or rendezvous file behind."""

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minivllm.engine import SamplingParams
from minivllm.engine.backend import TORCH
from minivllm.engine.checkpoint_config import load_model_args
from minivllm.engine.loader import load_weights
from minivllm.engine.qwen3 import Qwen3ForCausalLM
from minivllm.engine.tensor_parallel import TPGroup
from minivllm.testing.random_checkpoint import write_random_qwen3
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
    raises rank 0's own error, noting how the worker ended, and leaves no process or file."""
    llm = tp2("torch")
    worker, path = multiprocessing.active_children()[0], llm.workers.path
    llm.workers.check()
    worker.kill()
    worker.join(10)
    with pytest.raises(RuntimeError, match="worker stopped"):
        llm.workers.check()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker 1 was killed by SIGKILL; the workers were stopped and this LLM is closed"):
        llm.generate(prompts([5]), GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 5
    assert not multiprocessing.active_children() and not os.path.exists(path)


@pytest.mark.parametrize("cause", [KeyboardInterrupt, ValueError])
def test_an_interrupt_or_error_on_rank_0_stops_the_workers_at_once(checkpoint, tp2, monkeypatch, cause):
    """Rank 0 fails between steps, leaving its worker waiting in the next step's collective: the
    worker is terminated, the LLM closed, and the original exception (KeyboardInterrupt too)
    re-raised within seconds; nothing is left, and the LLM then refuses to run."""
    llm = tp2("torch")
    path, launch = llm.workers.path, llm.runner.launch
    steps = iter(range(2))

    def launch_then_fail(*args):
        if next(steps, None) is None:
            raise cause("stop at the third step")
        return launch(*args)

    monkeypatch.setattr(llm.runner, "launch", launch_then_fail)
    start = time.monotonic()
    with pytest.raises(cause, match="stop at the third step"):
        llm.generate(prompts([5]), GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 5
    assert not multiprocessing.active_children() and not os.path.exists(path)
    with pytest.raises(RuntimeError, match="this LLM was closed"):
        llm.generate(prompts([5]), GREEDY, use_tqdm=False)


@pytest.fixture(scope="module")
def script_checkpoint(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("tp-script"), with_tokenizer=False, seed=7, **CONFIGS["gqa-d32"])


def processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds `marker` (read from Linux's /proc)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
    return found


def start_script(source: str, tmp_path: Path, *args) -> tuple[subprocess.Popen, str]:
    """Start `source` as a script with `args` and tmp_path/tmp as its TMPDIR (where the rendezvous
    file goes); (the process, a marker in its and its workers' environment)."""
    (tmp_path / "tmp").mkdir()
    script = tmp_path / "script.py"
    script.write_text(source)
    run_id = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp"), "MINIVLLM_TEST_RUN": run_id}
    cmd = [sys.executable, str(script), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), f"MINIVLLM_TEST_RUN={run_id}"


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) once `proc` exits; killed, as subprocess.run does, at the timeout."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def assert_left_nothing(tmp_path: Path, marker: str) -> None:
    """No process of a script from start_script lives on, and its TMPDIR is empty."""
    deadline = time.monotonic() + 10  # spawn's resource tracker exits once it sees the script gone
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_with(marker), "a process outlived the script"
    assert not list((tmp_path / "tmp").iterdir()), "the rendezvous file outlived the script"


NO_MAIN_GUARD = """
import sys
from tests.engine_cases import engine

engine(sys.argv[1], "torch", tensor_parallel_size=2, device="cpu")
"""


def test_a_script_without_the_main_guard_fails_fast_and_says_why(script_checkpoint, tmp_path):
    """The spawned worker re-imports the script, whose LLM cannot spawn during that import, and
    exits before it joins the group: rank 0 must say so at once, not wait out the rendezvous."""
    proc, marker = start_script(NO_MAIN_GUARD, tmp_path, script_checkpoint)
    _, err = finish(proc, timeout=60)
    assert proc.returncode != 0
    assert "worker 1 exited with status 1 before joining the process group" in err
    assert 'under `if __name__ == "__main__":`' in err
    assert_left_nothing(tmp_path, marker)


GENERATE_THEN_SLEEP = """
import sys, time
from tests.engine_cases import GREEDY, engine, prompts

if __name__ == "__main__":
    llm = engine(sys.argv[1], "torch", tensor_parallel_size=2, device="cpu")
    llm.generate(prompts([5]), GREEDY, use_tqdm=False)
    print(llm.workers.path, flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_exit_without_close_or_a_killed_rank_0_leaves_nothing_behind(script_checkpoint, tmp_path, end):
    """Rank 0 exits without close() (its finalizer stops the worker), or is killed outright (the
    worker, waiting for rank 0's next command, fails and removes the rendezvous file itself)."""
    proc, marker = start_script(GENERATE_THEN_SLEEP, tmp_path, script_checkpoint, 0 if end == "exit" else 600)
    assert proc.stdout.readline().startswith(str(tmp_path / "tmp" / "minivllm-tp-"))
    if end == "kill":
        proc.kill()
    _, err = finish(proc, timeout=60)
    assert proc.returncode == (0 if end == "exit" else -9), err[-3000:]
    # The resource tracker unlinks semaphores their process left, with a warning: a killed rank 0
    # leaves its own, but no worker may leave one.
    assert end == "kill" or "leaked" not in err
    assert_left_nothing(tmp_path, marker)


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
    model = Qwen3ForCausalLM(args, TORCH, tp)
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
