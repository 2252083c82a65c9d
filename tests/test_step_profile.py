"""The engine's per-step time records and their summary."""

import pytest

from minivllm.engine import LLM, SamplingParams
from minivllm.engine.step_profile import StepRecord, batch_bucket, format_summary, summarize
from minivllm.testing.random_checkpoint import write_random_qwen3


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_generate_records_every_step(tmp_path, async_scheduling):
    """Prefill records count the prompt tokens, decode records one token per sequence, and every
    part of a step is timed."""
    path = str(write_random_qwen3(tmp_path, with_tokenizer=False))
    llm = LLM(path, max_model_len=64, device="cpu", attention_backend="torch", async_scheduling=async_scheduling)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 2)]
    llm.generate(prompts, params, use_tqdm=False)
    prefill = [r for r in llm.step_records if r.prefill]
    decode = [r for r in llm.step_records if not r.prefill]
    assert sum(r.new_tokens for r in prefill) == 8
    # The first token of each comes from the prefill: 3 + 1 decode tokens, over 3 steps.
    assert [r.batch for r in decode] == [2, 1, 1] and all(r.new_tokens == r.batch for r in decode)
    assert decode[0].context_tokens == 4 + 6  # both prompts plus their first token
    # Causal pairs by hand: the prompts score 3·4/2 + 5·6/2 = 21; a decode row scores its context.
    assert sum(r.attention_pairs for r in prefill) == 21
    assert [r.attention_pairs for r in decode] == [r.context_tokens for r in decode] == [10, 5, 6]
    assert all(r.schedule_s > 0 and r.prepare_s > 0 and r.launch_s > 0 and r.wait_s >= 0 and r.postprocess_s > 0 for r in llm.step_records)
    rows = summarize(llm.step_records)
    assert [(r["phase"], r["batch_up_to"], r["steps"]) for r in rows] == [("decode", 1, 2), ("decode", 2, 1), ("prefill", 2, 1)]
    # Each row sums its steps' work: the two one-row decodes read 5 and 6 tokens.
    assert [(r["rows"], r["new_tokens"], r["context_tokens"], r["attention_pairs"]) for r in rows] == [(2, 2, 11, 11), (2, 2, 10, 10), (2, 8, 8, 21)]
    assert 0 < rows[0]["host_share"] < 1
    llm.generate([[9, 9]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(llm.step_records) == 2  # the last call's steps only


def test_a_step_that_compiles_says_so(tmp_path, monkeypatch):
    """A Triton compile during a step's launch is counted on that step's record and summed in its
    summary row (a compile is simulated: the CPU's torch backend compiles nothing)."""
    from minivllm.kernels import compiles

    path = str(write_random_qwen3(tmp_path, with_tokenizer=False))
    llm = LLM(path, max_model_len=64, device="cpu", attention_backend="torch")
    launch = llm.runner.launch

    def launch_compiling_once(step, record=None):
        if record is not None and not any(r.compiles for r in llm.step_records):
            monkeypatch.setattr(compiles, "_count", compiles.compiles_so_far() + 1)
        return launch(step, record)

    monkeypatch.setattr(llm.runner, "launch", launch_compiling_once)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [r.compiles for r in llm.step_records] == [1, 0, 0]
    assert {row["phase"]: row["compiles"] for row in summarize(llm.step_records)} == {"prefill": 1, "decode": 0}


@pytest.mark.parametrize("batch, bucket", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (256, 256)])
def test_batch_bucket(batch, bucket):
    assert batch_bucket(batch) == bucket


def test_summary_medians_and_host_share():
    records = [StepRecord(False, 4, 4, 100, 100, 0.001, 0.002, 0.001, 0.010, 0.001) for _ in range(3)]
    records.append(StepRecord(False, 4, 4, 100, 100, 0.001, 0.002, 0.001, 0.030, 0.001))
    (row,) = summarize(records)
    assert row["median_wait_ms"] == pytest.approx(10.0) and row["median_host_ms"] == pytest.approx(5.0)
    assert row["host_share"] == pytest.approx(0.020 / (0.020 + 0.060))
    assert "decode" in format_summary(records).splitlines()[1]
