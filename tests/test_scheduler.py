"""The scheduler against a fake model: step limits, preemption by recompute, stopping, prefix hits."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import Config
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def make_scheduler(num_blocks=64, max_model_len=32, max_num_batched_tokens=64, max_num_seqs=8) -> Scheduler:
    config = Config(model="unused", device="cpu", kvcache_block_size=BLOCK, num_kvcache_blocks=num_blocks,
                    max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    return Scheduler(config)


def request(tokens, max_tokens=8, ignore_eos=True) -> Sequence:
    return Sequence(list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), BLOCK)


def fake_token(seq: Sequence) -> int:
    """What the fake model samples: a function of the tokens so far, so recompute yields the same."""
    return 100 + (sum(seq.token_ids) * 31 + len(seq)) % 97


def step(sched: Scheduler, eos_token_id=None):
    """One engine step; also returns the tokens the model would compute (postprocess frees finished ones)."""
    seqs, is_prefill = sched.schedule()
    new_tokens = sum(len(s) - s.num_cached_tokens for s in seqs) if is_prefill else len(seqs)
    finished = sched.postprocess(seqs, [fake_token(s) for s in seqs], set() if eos_token_id is None else {eos_token_id})
    return seqs, is_prefill, finished, new_tokens


def expected_completion(prompt, max_tokens, max_model_len):
    seq = request(prompt)
    # A prefill always samples one token, even from a prompt of max_model_len tokens.
    seq.append_token(fake_token(seq))
    while seq.num_completion_tokens < max_tokens and len(seq) < max_model_len:
        seq.append_token(fake_token(seq))
    return seq.completion_token_ids


def run_to_completion(sched: Scheduler, max_steps=10_000):
    steps = []
    while not sched.is_finished():
        assert len(steps) < max_steps, "the scheduler did not terminate"
        seqs, is_prefill, _, new_tokens = step(sched)
        steps.append(([s.seq_id for s in seqs], is_prefill, new_tokens))
    return steps


def test_prefill_respects_token_budget_and_max_num_seqs():
    sched = make_scheduler(max_model_len=32, max_num_batched_tokens=32, max_num_seqs=3)
    seqs = [request([i] * 12) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch, is_prefill, _, _ = step(sched)
    # A third 12-token prompt would make 36 > 32 tokens.
    assert is_prefill and batch == seqs[:2]
    batch, is_prefill, _, _ = step(sched)
    # The token budget allows two, but only one running slot is left.
    assert is_prefill and batch == seqs[2:3]
    batch, is_prefill, _, _ = step(sched)
    assert not is_prefill and batch == seqs[:3]
    assert list(sched.waiting) == seqs[3:] and all(s.status == SequenceStatus.WAITING for s in seqs[3:])


def test_decode_batches_fit_max_num_seqs():
    sched = make_scheduler(max_num_seqs=3)
    for i in range(7):
        sched.add(request([i + 1] * 5, max_tokens=4))
    steps = run_to_completion(sched)
    decode_sizes = [len(ids) for ids, is_prefill, _ in steps if not is_prefill]
    assert max(decode_sizes) == 3 and all(len(ids) <= 3 for ids, _, _ in steps)
    prefilled = sorted(i for ids, is_prefill, _ in steps if is_prefill for i in ids)
    assert len(prefilled) == 7 and len(set(prefilled)) == 7


def test_full_cache_preempts_the_youngest():
    sched = make_scheduler(num_blocks=6, max_model_len=24, max_num_batched_tokens=32)
    a, b, c = request(range(8)), request(range(20, 25)), request(range(40, 45))
    for s in (a, b, c):
        sched.add(s)
    assert step(sched)[0] == [a, b, c] and sched.block_manager.num_free_blocks == 0
    d = request(range(60, 63))
    sched.add(d)
    # a now has 9 tokens and needs a third block: c, the youngest, gives its two back and goes
    # ahead of d, which arrived later.
    batch, is_prefill, _, _ = step(sched)
    assert not is_prefill and batch == [a, b]
    assert list(sched.waiting) == [c, d] and c.status == SequenceStatus.WAITING and c.block_table == []
    assert sched.num_preemptions == 1 and list(sched.running) == [a, b]


def test_youngest_may_preempt_itself():
    sched = make_scheduler(num_blocks=2, max_model_len=8, max_num_batched_tokens=8)
    a, b = request([1, 2, 3], max_tokens=2), request([4, 5, 6, 7])
    sched.add(a)
    sched.add(b)
    assert step(sched)[0] == [a, b]
    batch, is_prefill, finished, _ = step(sched)
    assert not is_prefill and batch == [a] and finished == [a]
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1
    batch, is_prefill, _, _ = step(sched)
    assert is_prefill and batch == [b] and len(b) == 6


def test_preemption_drops_nothing_and_recomputes_the_same_tokens():
    sched = make_scheduler(num_blocks=8, max_model_len=32, max_num_batched_tokens=32)
    prompts = [list(range(10 * i, 10 * i + 6)) for i in range(4)]
    seqs = [request(p, max_tokens=10) for p in prompts]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    for s, p in zip(seqs, prompts, strict=True):
        assert s.is_finished and s.prompt_token_ids == p
        assert s.completion_token_ids == expected_completion(p, 10, 32)
    assert sched.block_manager.num_free_blocks == 8


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos_stops_unless_ignored(ignore_eos):
    sched = make_scheduler()
    prompt = [1, 2, 3]
    eos = expected_completion(prompt, 8, 32)[2]
    seq = request(prompt, max_tokens=6, ignore_eos=ignore_eos)
    sched.add(seq)
    finished = []
    while not finished:
        finished = step(sched, eos_token_id=eos)[2]
    assert finished == [seq] and seq.is_finished
    assert seq.num_completion_tokens == (6 if ignore_eos else 3)
    assert seq.completion_token_ids == expected_completion(prompt, seq.num_completion_tokens, 32)


def test_max_model_len_stops_a_sequence():
    sched = make_scheduler(max_model_len=12, max_num_batched_tokens=12)
    seq = request(range(10), max_tokens=100)
    sched.add(seq)
    run_to_completion(sched)
    assert len(seq) == 12 and seq.num_completion_tokens == 2


def test_prefix_hits_reduce_a_prefills_new_tokens():
    sched = make_scheduler(max_model_len=16, max_num_batched_tokens=16)
    shared = list(range(50, 58))
    a, b = request(shared + [1, 2]), request(shared + [3, 4])
    sched.add(a)
    sched.add(b)
    # 10 + 10 tokens exceed the budget of 16, but b's first two blocks are a's: 10 + 2 fit.
    batch, is_prefill, _, _ = step(sched)
    assert is_prefill and batch == [a, b]
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]


def test_finished_requests_leave_their_prefix_cached():
    sched = make_scheduler(max_model_len=16, max_num_batched_tokens=16)
    a = request(list(range(9)), max_tokens=3)
    sched.add(a)
    run_to_completion(sched)
    b = request(a.token_ids[:8] + [77])
    sched.add(b)
    step(sched)
    assert b.num_cached_tokens == 8 and sched.block_manager.num_cache_hit_blocks == 2


def test_impossible_request_raises_instead_of_looping():
    sched = make_scheduler(num_blocks=2, max_model_len=16, max_num_batched_tokens=16)
    sched.add(request(range(12)))
    with pytest.raises(RuntimeError, match="cannot schedule"):
        sched.schedule()
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(request(range(17)))


@settings(max_examples=60)
@given(
    num_blocks=st.integers(4, 12),
    max_num_seqs=st.integers(1, 5),
    requests=st.lists(st.tuples(st.integers(0, 15), st.integers(1, 12), st.integers(0, 3)), min_size=1, max_size=8),
)
def test_random_workloads_finish_within_limits(num_blocks, max_num_seqs, requests):
    # The cache always holds one max_model_len sequence, as Config.check_cache_holds_one_sequence demands.
    sched = make_scheduler(num_blocks=num_blocks, max_model_len=16, max_num_batched_tokens=20, max_num_seqs=max_num_seqs)
    seqs = [request([v % 3] * n + [v], max_tokens=m) for n, m, v in requests]
    for s in seqs:
        sched.add(s)
    steps = run_to_completion(sched)
    for ids, is_prefill, new_tokens in steps:
        assert len(ids) <= max_num_seqs
        if is_prefill:
            assert new_tokens <= 20
    for s, (n, m, v) in zip(seqs, requests, strict=True):
        assert s.is_finished and s.completion_token_ids == expected_completion([v % 3] * n + [v], m, 16)
    assert sched.block_manager.num_free_blocks == num_blocks


def test_admission_hashes_each_prefix_block_once(monkeypatch):
    """Admitting a sequence matches its prefix against the cache once, not once each for the
    hit count, the room check and the allocation."""
    import engine.block_manager as bm

    sched = make_scheduler()
    prompt = list(range(1, 6 * BLOCK + 2))  # 6 full blocks and a partial one
    sched.add(request(prompt))
    step(sched)  # caches the first sequence's full blocks
    calls = []
    real = bm.compute_hash
    monkeypatch.setattr(bm, "compute_hash", lambda tokens, prefix: calls.append(1) or real(tokens, prefix))
    sched.add(request(prompt))
    seqs, is_prefill, _, _ = step(sched)
    assert is_prefill and seqs[0].num_cached_tokens == 6 * BLOCK
    assert len(calls) <= 6 + 1
