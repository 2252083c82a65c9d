"""A prefill step's rows padded up the ladder (minivllm/engine/prefill_padding.py) change nothing
real: the real rows' hidden states and the whole KV cache are those of the same step unpadded."""

import dataclasses

import pytest
import torch

from minivllm.engine.prefill_padding import padded_token_count
from minivllm.engine.scheduler import ScheduledStep
from minivllm.engine.sequence import Sequence
from minivllm.testing.random_checkpoint import write_random_qwen3
from tests.engine_cases import BLOCK, GREEDY, engine, prompts


def test_the_ladder_rounds_up_by_at_most_an_eighth_and_repeats_few_sizes():
    cap = 1 << 14
    sizes = [padded_token_count(n, cap) for n in range(1, cap + 1)]
    for n, p in enumerate(sizes, start=1):
        assert n <= p <= cap and (p - n < 16 if n <= 128 else p - n < n / 8), (n, p)
    # Eight rungs an octave above the smallest step: 8 up to 128, then 8 per doubling to 2^14.
    assert len(set(sizes)) == 8 + 8 * 7
    assert sizes == sorted(sizes)


def test_the_ladder_stops_at_the_cap_but_never_below_the_count():
    assert padded_token_count(16000, 16100) == 16100
    assert padded_token_count(20000, 16384) == 20000
    with pytest.raises(ValueError, match="num_tokens"):
        padded_token_count(0, 64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("padding"), with_tokenizer=False)


def prefill(llm, step: ScheduledStep, padded: bool, rows: list[int]) -> torch.Tensor:
    """The step's real rows' hidden states, its keys and values written into the cache; appends
    the rows it ran to `rows`."""
    ids, positions, meta, _ = llm.runner.prepare_chunks(step)
    n = meta.num_tokens
    if not padded:
        ids, positions = ids[:n], positions[:n]
        meta = dataclasses.replace(meta, slot_mapping=meta.slot_mapping[:n], num_tokens=None)
    rows.append(len(ids))
    with torch.inference_mode():
        hidden = llm.model(ids, positions, llm.runner.kv_caches, meta)
    assert hidden.isfinite().all()  # the padding rows too: attention gives them zeros
    return hidden[:n]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_prefill_matches_unpadded(checkpoint, backend):
    """Two steps: first chunks of three prompts (contiguous keys), then their rest (keys read
    from the paged cache); 33 and 22 real tokens padded to 48 and 32 rows."""
    results, rows = {}, []
    for padded in (True, False):
        # A fresh engine each, so that both place the prompts in the same blocks.
        llm = engine(checkpoint, backend, max_num_batched_tokens=64)
        llm.runner.kv_cache.fill_(0.5)
        seqs = [Sequence(p, GREEDY, BLOCK) for p in prompts((9, 17, 29), seed=3)]
        firsts, rests = ScheduledStep(), ScheduledStep()
        for seq, first in zip(seqs, (5, 16, 12), strict=True):
            llm.scheduler.block_manager.allocate(seq)
            firsts.add(seq, first)
        hidden = [prefill(llm, firsts, padded, rows)]
        for seq in seqs:
            rests.add(seq, len(seq) - seq.num_computed_tokens)
        hidden.append(prefill(llm, rests, padded, rows))
        results[padded] = hidden, llm.runner.kv_cache
    (padded_hidden, padded_cache), (hidden, cache) = results[True], results[False]
    assert [h.shape[0] for h in hidden] == [33, 22]
    assert rows == [48, 32, 33, 22]
    # float32, but not bit for bit on a GPU: cuBLAS picks its algorithm by the row count. A
    # padding row written into the cache or read by attention moves values by whole units.
    for a, b in zip(padded_hidden, hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded_cache, cache, rtol=1e-4, atol=1e-4)
