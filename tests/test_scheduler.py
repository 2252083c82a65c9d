"""The scheduler against a fake model: step limits, chunked prefill, preemption by recompute,
stopping, prefix hits, and async scheduling (the next step planned before the last one's tokens
are known) giving exactly the tokens of synchronous scheduling."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.engine.config import Config
from minivllm.engine.sampling_params import SamplingParams
from minivllm.engine.scheduler import ScheduledStep, Scheduler
from minivllm.engine.sequence import PENDING, Sequence, SequenceStatus

BLOCK = 4


def make_scheduler(num_blocks=64, max_model_len=32, max_num_batched_tokens=64, max_num_seqs=8, chunk_cap=None) -> Scheduler:
    # The scheduler runs no attention; "torch" keeps Config from asking for the interpreter on a GPU machine.
    config = Config(model="unused", device="cpu", attention_backend="torch", kvcache_block_size=BLOCK, num_kvcache_blocks=num_blocks,
                    max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                    long_prefill_token_threshold=chunk_cap)
    return Scheduler(config)


def request(tokens, max_tokens=8, ignore_eos=True) -> Sequence:
    return Sequence(list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), BLOCK)


def fake_token(tokens: list[int]) -> int:
    """What the fake model samples after `tokens`: a function of them, so recompute yields the same."""
    return 100 + (sum(tokens) * 31 + len(tokens)) % 97


class FakeDevice:
    """Samples each step's tokens as a model would: from every token before the sampled position,
    including tokens it sampled itself that the host does not know yet (PENDING there)."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}

    def run(self, step: ScheduledStep) -> list[int]:
        out = []
        for seq, start, n, sampled in zip(step.seqs, step.starts, step.num_new, step.samples, strict=True):
            known = self.tokens.get(seq.seq_id, [])
            # The device has every token up to the row's end: the host's where known, its own after.
            context = [t if t != PENDING else known[i] for i, t in enumerate(seq.token_ids[: start + n])]
            if sampled:
                out.append(fake_token(context))
                self.tokens[seq.seq_id] = context + [out[-1]]
        return out


def step(sched: Scheduler, eos_token_id=None, device=None):
    """One synchronous engine step: (rows' sequences, whether any row is a prefill chunk, the
    finished sequences, the tokens computed)."""
    scheduled = sched.schedule()
    tokens = (device or FakeDevice()).run(scheduled)
    finished = sched.postprocess(scheduled, tokens, set() if eos_token_id is None else {eos_token_id})
    return scheduled.seqs, not scheduled.is_decode, finished, scheduled.num_tokens


def expected_completion(prompt, max_tokens, max_model_len):
    tokens = list(prompt)
    # A prefill always samples one token, even from a prompt of max_model_len tokens.
    tokens.append(fake_token(tokens))
    while len(tokens) - len(prompt) < max_tokens and len(tokens) < max_model_len:
        tokens.append(fake_token(tokens))
    return tokens[len(prompt) :]


def run_to_completion(sched: Scheduler, max_steps=10_000, async_scheduling=False, eos_token_id=None, prepare=None):
    """Drive the scheduler as LLM._run does, with the fake device; one (row seq ids, prefill?,
    tokens, samples) per step. Async: step n + 1 is scheduled before step n's tokens are known.
    prepare(step), when given, sees each step before it runs, as the model runner does."""
    device, steps, in_flight = FakeDevice(), [], None
    eos = set() if eos_token_id is None else {eos_token_id}
    while in_flight or not sched.is_finished():
        assert len(steps) < max_steps, "the scheduler did not terminate"
        scheduled = sched.schedule(in_flight=in_flight is not None)
        launched = None
        if scheduled.seqs:
            if prepare is not None:
                prepare(scheduled)
            steps.append(([s.seq_id for s in scheduled.seqs], not scheduled.is_decode, scheduled.num_tokens, list(scheduled.samples)))
            launched = (scheduled, device.run(scheduled))
        done, in_flight = (in_flight, launched) if async_scheduling else (launched, None)
        if done is not None:
            sched.postprocess(*done, eos)
    return steps


def test_prefill_respects_token_budget_and_max_num_seqs():
    sched = make_scheduler(max_model_len=32, max_num_batched_tokens=32, max_num_seqs=3, chunk_cap=32)
    seqs = [request([i] * 12) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch, is_prefill, _, tokens = step(sched)
    # Two 12-token prompts and the first 8 tokens of a third fill the 32-token budget; the third
    # is running, so the sequence limit keeps the rest waiting.
    assert is_prefill and batch == seqs[:3] and tokens == 32
    assert seqs[2].num_completion_tokens == 0 and seqs[2].num_computed_tokens == 8
    batch, is_prefill, _, tokens = step(sched)
    # Decodes go first, then the third prompt's last 4 tokens.
    assert is_prefill and batch == seqs[:3] and tokens == 2 + 4
    assert all(s.num_completion_tokens == n for s, n in zip(seqs[:3], (2, 2, 1), strict=True))
    batch, is_prefill, _, _ = step(sched)
    assert not is_prefill and batch == seqs[:3]
    assert list(sched.waiting) == seqs[3:] and all(s.status == SequenceStatus.WAITING for s in seqs[3:])


def test_decode_batches_fit_max_num_seqs():
    sched = make_scheduler(max_num_seqs=3)
    seqs = [request([i + 1] * 5, max_tokens=4) for i in range(7)]
    for s in seqs:
        sched.add(s)
    steps = run_to_completion(sched)
    assert max(len(ids) for ids, *_ in steps) == 3
    assert all(s.is_finished and s.num_completion_tokens == 4 for s in seqs)


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
    # b's first block is still cached from before its preemption: one token is left to compute.
    batch, _, _, tokens = step(sched)
    assert batch == [b] and tokens == 1 and b.num_cached_tokens == 4 and len(b) == 6


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
    sched = make_scheduler(max_model_len=16, max_num_batched_tokens=16, chunk_cap=16)
    shared = list(range(50, 58))
    a, b = request(shared + [1, 2]), request(shared + [3, 4])
    sched.add(a)
    sched.add(b)
    # 10 + 10 tokens exceed the budget of 16, but b's first two blocks are a's, registered as a
    # was scheduled in the same step: 10 + 2 fit.
    batch, is_prefill, _, tokens = step(sched)
    assert is_prefill and batch == [a, b] and tokens == 12
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


@pytest.mark.parametrize("num_blocks", [7, 8, 9, 10])
def test_prefix_hits_count_the_prompt_at_first_admission(num_blocks):
    """A request's metrics count the prompt tokens the prefix cache served when it was first
    admitted. Readmitted after a preemption it hits blocks of its own, generated tokens included,
    which were computed for it and are no prefix hit: an 11-token prompt once reported 16."""
    sched = make_scheduler(num_blocks=num_blocks, max_model_len=32, max_num_batched_tokens=32)
    shared = list(range(8))
    a, b = request(shared + [8], max_tokens=14), request(shared + [20, 21, 22], max_tokens=14)
    sched.add(a)
    sched.add(b)
    run_to_completion(sched)
    assert b.metrics.num_preemptions == (num_blocks < 10)  # the smaller caches preempt b
    assert (a.metrics.num_cached_tokens, b.metrics.num_cached_tokens) == (0, 8)


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
    for ids, _, new_tokens, _ in steps:
        assert len(ids) <= max_num_seqs and new_tokens <= 20
    for s, (n, m, v) in zip(seqs, requests, strict=True):
        assert s.is_finished and s.completion_token_ids == expected_completion([v % 3] * n + [v], m, 16)
    assert sched.block_manager.num_free_blocks == num_blocks


def test_admission_hashes_each_prefix_block_once(monkeypatch):
    """Admitting a sequence matches its prefix against the cache once, not once each for the
    hit count, the room check and the allocation."""
    import minivllm.engine.block_manager as bm

    sched = make_scheduler()
    prompt = list(range(1, 6 * BLOCK + 2))  # 6 full blocks and a partial one
    sched.add(request(prompt))
    step(sched)  # caches the first sequence's full blocks
    calls = []
    real = bm.compute_hash
    monkeypatch.setattr(bm, "compute_hash", lambda tokens, prefix: calls.append(1) or real(tokens, prefix))
    second = request(prompt)
    sched.add(second)
    seqs, _, _, _ = step(sched)
    assert second in seqs and second.num_cached_tokens == 6 * BLOCK
    assert len(calls) <= 6 + 1


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks():
    sched = make_scheduler(max_model_len=64, max_num_batched_tokens=8)
    prompt = list(range(1, 30))  # 29 tokens: chunks of 8, 8, 8 and 5, sampling only after the last
    seq = request(prompt, max_tokens=3)
    sched.add(seq)
    steps = run_to_completion(sched)
    assert [(tokens, samples) for _, _, tokens, samples in steps[:4]] == [(8, [False]), (8, [False]), (8, [False]), (5, [True])]
    assert seq.completion_token_ids == expected_completion(prompt, 3, 64)


def test_a_short_request_behind_a_long_prompt_gets_its_first_token_first():
    """The long prompt's chunk takes at most a quarter of the budget while another request waits,
    so the short one is admitted beside it and samples long before the long prefill ends."""
    sched = make_scheduler(max_model_len=64, max_num_batched_tokens=16)
    long, short = request(range(1, 60), max_tokens=2), request([5, 6, 7], max_tokens=2)
    sched.add(long)
    sched.add(short)
    steps = run_to_completion(sched)
    first_sample = {sid: next(n for n, (ids, _, _, samples) in enumerate(steps) if sid in [i for i, s in zip(ids, samples, strict=True) if s])
                    for sid in (long.seq_id, short.seq_id)}
    assert first_sample[short.seq_id] == 0 < first_sample[long.seq_id]
    assert all(tokens <= 16 for _, _, tokens, _ in steps)
    assert long.completion_token_ids == expected_completion(list(range(1, 60)), 2, 64)


def test_a_partly_prefilled_sequence_can_be_preempted_and_recomputed():
    sched = make_scheduler(num_blocks=7, max_model_len=32, max_num_batched_tokens=4, chunk_cap=4)
    grower = request([9, 9, 9], max_tokens=20)
    sched.add(grower)
    step(sched)
    # 19 tokens, 5 blocks, prefilled 3 a step beside grower's decode; grower takes its third
    # block of the 7 at 9 tokens, 5 steps on, with the long prompt still 4 tokens short.
    long = request(range(1, 20), max_tokens=2)
    sched.add(long)
    preempted_mid_prefill = False
    while not sched.is_finished():
        step(sched)
        preempted_mid_prefill |= long.status == SequenceStatus.WAITING and long.metrics.num_preemptions > 0 and not long.num_completion_tokens
    assert preempted_mid_prefill
    assert long.completion_token_ids == expected_completion(list(range(1, 20)), 2, 32)
    assert grower.completion_token_ids == expected_completion([9, 9, 9], 20, 32)
    assert sched.block_manager.num_free_blocks == 7


@settings(max_examples=80)
@given(
    num_blocks=st.integers(6, 14),
    budget=st.integers(3, 24),
    max_num_seqs=st.integers(1, 5),
    requests=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 10), st.integers(0, 3)), min_size=1, max_size=8),
    eos=st.sampled_from([None, *range(100, 197)]),
)
def test_async_scheduling_gives_the_tokens_of_sync_scheduling(num_blocks, budget, max_num_seqs, requests, eos):
    """Planning each step before the last one's tokens are known changes no output: the same
    tokens, nothing past an EOS, every block back; a sequence costs at most one row of work after
    its last token."""
    outcomes = []
    for async_scheduling in (False, True):
        sched = make_scheduler(num_blocks=num_blocks, max_model_len=24, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
        seqs = [Sequence([v % 3] * n + [v], SamplingParams(max_tokens=m, ignore_eos=False), BLOCK) for n, m, v in requests]
        for s in seqs:
            sched.add(s)
        steps = run_to_completion(sched, async_scheduling=async_scheduling, eos_token_id=eos)
        assert all(len(ids) <= max_num_seqs and tokens <= budget for ids, _, tokens, _ in steps)
        assert all(s.is_finished and s.num_pending_tokens == 0 for s in seqs)
        assert sched.block_manager.num_free_blocks == num_blocks
        samples = {s.seq_id: sum(sid == s.seq_id and sampled for ids, _, _, flags in steps for sid, sampled in zip(ids, flags, strict=True)) for s in seqs}
        for s in seqs:
            assert eos not in s.completion_token_ids[:-1]
            assert samples[s.seq_id] <= s.num_completion_tokens + (1 if async_scheduling else 0)
        outcomes.append([s.completion_token_ids for s in seqs])
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_decode_rows_reordered_longest_first_keep_every_sequences_tokens(async_scheduling):
    """The model runner puts a decode step's rows in descending context order before it runs
    them (ScheduledStep.longest_first); the step's tokens then come back in that order, and each
    sequence still gets exactly its own."""
    sched = make_scheduler(max_num_seqs=6)
    prompts = [[i + 1] * n for i, n in enumerate((3, 11, 6, 17, 1, 9))]
    seqs = [request(p, max_tokens=5) for p in prompts]
    for s in seqs:
        sched.add(s)
    decode_orders = []

    def reorder(scheduled):
        if scheduled.is_decode:
            scheduled.longest_first()
            decode_orders.append(list(scheduled.starts))

    run_to_completion(sched, async_scheduling=async_scheduling, prepare=reorder)
    assert decode_orders and all(starts == sorted(starts, reverse=True) for starts in decode_orders)
    assert any(len(set(starts)) > 1 for starts in decode_orders)  # some step had rows to reorder
    for s, p in zip(seqs, prompts, strict=True):
        assert s.completion_token_ids == expected_completion(p, 5, 32)


def test_longest_first_moves_every_row_list_together():
    step_ = ScheduledStep()
    seqs = [request([1] * n) for n in (4, 9, 2, 9)]
    for s in seqs:
        s.num_computed_tokens = len(s) - 1
        step_.add(s, 1)
    step_.longest_first()
    assert [s.seq_id for s in step_.seqs] == [seqs[i].seq_id for i in (1, 3, 0, 2)]  # ties keep their order
    assert step_.starts == [8, 8, 3, 1] and step_.num_new == [1] * 4 and step_.samples == [True] * 4
