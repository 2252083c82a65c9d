"""benchmarks.engine_profile: its kernel table over a trace, and a whole run on this device."""

import pytest

from benchmarks import engine_profile


def _kernel(name, ts, dur, grid):
    return dict(ph="X", cat="kernel", name=name, ts=ts, dur=dur, args=dict(grid=grid))


def test_kernel_table_groups_by_name_and_grid_per_step():
    trace = dict(traceEvents=[
        _kernel("_skinny_linear", 0, 6.0, [64, 1, 1]), _kernel("_skinny_linear", 10, 8.0, [384, 1, 1]),
        _kernel("_skinny_linear", 20, 6.5, [64, 1, 1]), _kernel("_skinny_linear", 30, 8.0, [384, 1, 1]),
        _kernel("_skinny_linear", 40, 5.5, [64, 1, 1]),
        dict(ph="X", cat="cpu_op", name="aten::mm", ts=0, dur=100.0),  # host work is not a kernel
    ])
    rows, busy, span = engine_profile.kernel_table(trace, steps=2)
    assert rows == [("_skinny_linear [64, 1, 1]", 9.0, 1.5, 6.0), ("_skinny_linear [384, 1, 1]", 8.0, 1.0, 8.0)]
    assert busy == 34.0 and span == 45.5
    assert engine_profile.kernel_table(dict(traceEvents=[]), steps=1) == ([], 0.0, 0.0)


def test_a_run_reports_both_runs_step_by_step(capsys, device, tmp_path):
    if device.type == "cuda":
        pytest.skip("on a GPU it profiles Qwen3-0.6B for a minute; tests run its CPU smoke run")
    assert engine_profile.main(["--decode-steps", "2", "--trace-dir", str(tmp_path / "traces")]) == 0
    out = capsys.readouterr().out
    assert "prefill: 1 steps (1 prefill)" in out and "one row: 3 steps (1 prefill)" in out
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["one_row.json.gz", "prefill.json.gz"]
    with pytest.raises(SystemExit):
        engine_profile.main(["--decode-steps", "0"])
