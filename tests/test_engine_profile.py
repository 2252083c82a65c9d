"""benchmarks.engine_profile: its kernel tables over a trace, and a whole run on this device."""

import gzip
import json

import pytest

from benchmarks import engine_profile
from minivllm.engine.step_profile import StepRecord, annotated_kind, step_annotation


def _kernel(name, ts, dur, grid, corr):
    return dict(ph="X", cat="kernel", name=name, ts=ts, dur=dur, args=dict(grid=grid, correlation=corr))


def _launch(ts, corr, cat="cuda_runtime"):
    return dict(ph="X", cat=cat, name="cudaLaunchKernel", ts=ts, dur=1.0, args=dict(correlation=corr))


def _step(index, kind, ts, dur):
    return dict(ph="X", cat="user_annotation", name=step_annotation(index, StepRecord(kind == "prefill", 4, 4, 4, 4)), ts=ts, dur=dur)


def test_kernel_tables_split_by_the_step_that_launched_them():
    """Two prefill steps and one decode step; a graph replay's kernels share its launch's
    correlation id; a kernel launched outside any step is 'other'; host work is no kernel."""
    trace = dict(traceEvents=[
        _step(0, "prefill", 0, 10), _step(1, "prefill", 20, 10), _step(2, "decode", 40, 10),
        _launch(2, 1), _launch(5, 2, "cuda_driver"), _launch(22, 3), _launch(42, 4), _launch(60, 5),
        _kernel("_skinny_linear", 100, 6.0, [64, 1, 1], 1), _kernel("_flash_fwd", 110, 20.0, [8, 16, 1], 2),
        _kernel("_skinny_linear", 130, 8.0, [64, 1, 1], 3),
        _kernel("_paged_decode", 140, 5.0, [1, 8, 32], 4), _kernel("_merge_splits", 146, 2.0, [1, 16, 1], 4),
        _kernel("argmax", 150, 1.5, None, 5),
        dict(ph="X", cat="cpu_op", name="aten::mm", ts=0, dur=100.0),
        dict(ph="X", cat="user_annotation", name="minivllm stepping stone", ts=58, dur=5),  # not a step's range
    ])
    tables, busy, span = engine_profile.kernel_tables(trace, {"prefill": 2, "decode": 1, "other": 1})
    assert tables["prefill"] == [("_flash_fwd [8, 16, 1]", 10.0, 0.5, 20.0), ("_skinny_linear [64, 1, 1]", 7.0, 1.0, 7.0)]
    assert tables["decode"] == [("_paged_decode [1, 8, 32]", 5.0, 1.0, 5.0), ("_merge_splits [1, 16, 1]", 2.0, 1.0, 2.0)]
    assert tables["other"] == [("argmax", 1.5, 1.0, 1.5)]
    assert busy == 42.5 and span == 51.5
    assert engine_profile.kernel_tables(dict(traceEvents=[]), {}) == ({}, 0.0, 0.0)


def test_attention_rate_counts_decode_attention_over_decode_contexts():
    """Only the attention kernels of the decode table, over the decode records' contexts: a
    prefill record's context and a projection's time stay out."""
    rows = [("_paged_decode [4, 8, 1]", 30.0, 28.0, 1.07), ("nvjet_sm90_tst_64x32 [2, 64, 1]", 12.0, 28.0, 0.43),
            ("_merge_splits [4, 16, 1]", 6.0, 28.0, 0.21), ("_shared_prefix [1, 8, 2]", 4.0, 28.0, 0.14)]
    records = [StepRecord(False, 4, 4, 1000, 1000), StepRecord(False, 4, 4, 1004, 1004), StepRecord(True, 2, 300, 300, 45150)]
    us, nbytes = engine_profile.attention_rate(rows, records, kv_token_bytes=100)
    assert us == 40.0 and nbytes == 100 * 1002
    assert engine_profile.attention_rate(rows, [], 100) == (40.0, 0.0)


def test_a_run_reports_both_runs_step_by_step(capsys, device, tmp_path):
    """The CPU run: step records of both runs, and traces in which every step is named."""
    if device.type == "cuda":
        pytest.skip("on a GPU it profiles Qwen3-0.6B for a minute; tests run its CPU smoke run")
    assert engine_profile.main(["--decode-steps", "2", "--trace-dir", str(tmp_path / "traces")]) == 0
    out = capsys.readouterr().out
    assert "full batch: 3 steps (1 prefill)" in out and "one row: 3 steps (1 prefill)" in out
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["full_batch.json.gz", "one_row.json.gz"]
    events = json.loads(gzip.open(tmp_path / "traces" / "one_row.json.gz").read())["traceEvents"]
    named = [e["name"] for e in events if e.get("cat") == "user_annotation" and annotated_kind(e["name"])]
    assert named == ["minivllm step 0 prefill x1", "minivllm step 1 decode x1", "minivllm step 2 decode x1"]
    assert engine_profile.main(["--decode-steps", "1", "--rows", "3", "--trace-dir", str(tmp_path / "traces")]) == 0
    assert "3 rows: 2 steps (1 prefill)" in capsys.readouterr().out
    events = json.loads(gzip.open(tmp_path / "traces" / "3_rows.json.gz").read())["traceEvents"]
    assert "minivllm step 1 decode x3" in [e["name"] for e in events if e.get("cat") == "user_annotation"]
    for bad in (["--decode-steps", "0"], ["--rows", "0"], ["--rows", "257"], ["--preset", "qwen3-30b-a3b"]):  # an MoE preset the engine cannot build
        with pytest.raises(SystemExit):
            engine_profile.main(bad)
