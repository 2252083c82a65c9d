"""Each generate() call stands alone on one LLM: a call that raises part way (KeyboardInterrupt
or any exception) drops its requests and frees their KV blocks, and a call from a second thread
waits for the first; either way the next call gives the tokens a fresh LLM gives."""

import threading
import time

import pytest

import minivllm.engine.model_runner as model_runner
from minivllm.engine import LLM, SamplingParams
from minivllm.testing.random_checkpoint import write_random_qwen3

# A cache of 12 blocks of 4 tokens is too small for these requests together (about 14 blocks),
# so the run preempts: the interrupted call leaves sequences waiting, some with pending tokens.
PROMPTS = [list(range(10, 19)), list(range(40, 46)), list(range(70, 81))]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
NUM_BLOCKS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("tiny"), with_tokenizer=False, device="cpu")


def engine(checkpoint, async_scheduling=True) -> LLM:
    return LLM(str(checkpoint), max_model_len=32, max_num_batched_tokens=16, kvcache_block_size=4, num_kvcache_blocks=NUM_BLOCKS,
               device="cpu", attention_backend="torch", async_scheduling=async_scheduling)


def token_ids(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def fresh_tokens(checkpoint):
    llm = engine(checkpoint)
    tokens = token_ids(llm)
    assert llm.scheduler.num_preemptions > 0  # the workload preempts, as the tests below need
    return tokens


def fail_on_call(target, name: str, n: int, error: BaseException, monkeypatch) -> None:
    """Make target.name raise `error` on its n-th call, before doing anything."""
    original, calls = getattr(target, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


# (what fails, on which call): the step's launch before the model runs (its blocks are
# registered in the prefix cache but their KV is never written), the sampler after the model
# ran, and the scheduler's postprocess while the next step is in flight.
PLACES = [("launch", 1), ("launch", 5), ("sample", 3), ("postprocess", 4), ("schedule", 6)]


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("device fault")], ids=["interrupt", "exception"])
@pytest.mark.parametrize("place, n", PLACES)
def test_a_failed_generate_leaves_the_llm_usable(checkpoint, fresh_tokens, monkeypatch, async_scheduling, error, place, n):
    llm = engine(checkpoint, async_scheduling)
    target = {"launch": llm.runner, "sample": model_runner, "postprocess": llm.scheduler, "schedule": llm.scheduler}[place]
    fail_on_call(target, place, n, error, monkeypatch)
    with pytest.raises(type(error)):
        token_ids(llm)
    monkeypatch.undo()
    # The interrupted requests were dropped and every block is free again.
    assert llm.scheduler.is_finished() and llm.scheduler.block_manager.num_free_blocks == NUM_BLOCKS
    assert all(b.ref_count == 0 for b in llm.scheduler.block_manager.blocks)
    # The same prompts again: any prefix block the failed call registered must hold real KV.
    assert token_ids(llm) == fresh_tokens
    assert llm.scheduler.block_manager.num_free_blocks == NUM_BLOCKS


def test_a_failed_generate_keeps_the_prefix_cache_of_earlier_calls(checkpoint, fresh_tokens, monkeypatch):
    """Blocks that finished calls cached still serve hits after a failed call."""
    llm = engine(checkpoint)
    token_ids(llm, PROMPTS[:1])
    fail_on_call(llm.runner, "launch", 1, KeyboardInterrupt(), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        token_ids(llm, PROMPTS[1:])
    monkeypatch.undo()
    hits = llm.scheduler.block_manager.num_cache_hit_blocks
    assert token_ids(llm, PROMPTS[:1]) == fresh_tokens[:1]
    assert llm.scheduler.block_manager.num_cache_hit_blocks > hits


def test_two_threads_generating_on_one_llm_get_their_own_tokens(checkpoint, fresh_tokens, monkeypatch):
    """The second thread's call waits for the first: each gets the tokens of a sequential run."""
    llm = engine(checkpoint)
    original, started = llm.runner.launch, threading.Event()

    def slow_launch(*args, **kwargs):
        started.set()
        time.sleep(0.01)  # keeps the first call running while the second one starts
        return original(*args, **kwargs)

    monkeypatch.setattr(llm.runner, "launch", slow_launch)
    results, errors = {}, []

    def run(name, prompts):
        try:
            results[name] = token_ids(llm, prompts)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    first = threading.Thread(target=run, args=("first", PROMPTS))
    second = threading.Thread(target=run, args=("second", PROMPTS[::-1]))
    first.start()
    assert started.wait(60)
    second.start()
    first.join(120)
    second.join(120)
    assert not errors and results == {"first": fresh_tokens, "second": fresh_tokens[::-1]}
    monkeypatch.undo()
    assert llm.scheduler.block_manager.num_free_blocks == NUM_BLOCKS
    assert token_ids(llm) == fresh_tokens


def test_generate_called_from_inside_generate_is_refused(checkpoint, monkeypatch):
    """A call re-entering generate on the thread already in it (from a callback, say) would
    otherwise wait for itself forever."""
    llm = engine(checkpoint)
    original, inner = llm.runner.launch, []

    def reentering_launch(*args, **kwargs):
        if not inner:
            with pytest.raises(RuntimeError, match="generate is already running on this thread") as e:
                token_ids(llm)
            inner.append(e.value)
        return original(*args, **kwargs)

    monkeypatch.setattr(llm.runner, "launch", reentering_launch)
    token_ids(llm)
    assert inner


def test_close_waits_for_a_generate_call_on_another_thread(checkpoint, fresh_tokens, monkeypatch):
    """close() from a second thread returns only once the running call has finished with its
    tokens; from inside the call, on its own thread, it is refused instead of waiting forever."""
    llm = engine(checkpoint)
    original, started, release, inner = llm.runner.launch, threading.Event(), threading.Event(), []

    def held_launch(*args, **kwargs):
        if not started.is_set():
            with pytest.raises(RuntimeError, match="close\\(\\) was called from inside generate") as e:
                llm.close()
            inner.append(e.value)
            started.set()
            assert release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(llm.runner, "launch", held_launch)
    results = {}
    generating = threading.Thread(target=lambda: results.update(tokens=token_ids(llm)))
    generating.start()
    assert started.wait(60)
    closing = threading.Thread(target=llm.close)
    closing.start()
    closing.join(0.5)
    assert closing.is_alive(), "close() returned while generate was still running"
    release.set()
    generating.join(120)
    closing.join(60)
    assert not closing.is_alive() and inner and results["tokens"] == fresh_tokens
