"""benchmarks.baseline: a card's baseline from several runs, the old baseline's rows carried over."""

import json

import pytest

from benchmarks import baseline, compare
from benchmarks.results import load
from tests.benchmark_json import H100, bench, write


def test_later_runs_replace_rows_and_the_old_baseline_fills_the_rest(tmp_path, capsys):
    old = write(tmp_path / "old.json", [bench("decode", "triton_paged", 2e-5), bench("decode", "sdpa_dense", 2e-5)], read_gbps=3100.0)
    first = write(tmp_path / "first.json", [bench("decode", "triton_paged", 1.9e-5), bench("prefill", "flash_triton", 1e-3)], read_gbps=3200.0)
    second = write(tmp_path / "second.json", [bench("prefill", "flash_triton", 0.9e-3)], read_gbps=3300.0, matmul_tflops=790.0)
    out = tmp_path / "baseline.json"
    assert baseline.main([str(out), str(old), str(first), str(second)]) == 0
    data = load(out)
    medians = {b["extra_info"]["impl"]: b["stats"]["median"] for b in data["benchmarks"]}
    assert medians == {"triton_paged": 1.9e-5, "sdpa_dense": 2e-5, "flash_triton": 0.9e-3}
    assert all("data" not in b["stats"] and b["stats"]["rounds"] == 25 for b in data["benchmarks"])
    info = data["machine_info"]
    assert info["read_gbps"] == 3300.0 and info["matmul_tflops"] == 790.0
    runs = {r["file"]: r for r in info["merged_runs"]}
    assert runs["old.json"]["benchmarks"] == [bench("decode", "sdpa_dense", 1)["name"]] and runs["old.json"]["read_gbps"] == 3100.0
    assert runs["first.json"]["benchmarks"] == [bench("decode", "triton_paged", 1)["name"]]
    assert runs["second.json"]["benchmarks"] == [bench("prefill", "flash_triton", 1, size=4096)["name"]]
    assert "wrote 3 rows" in capsys.readouterr().out
    # The baseline reads as a run: compared with the newest run, its rows match.
    assert compare.main([str(out), str(second), "--allow-missing"]) == 0


def test_a_run_that_gives_no_row_is_not_listed(tmp_path):
    stale = write(tmp_path / "stale.json", [bench("decode", "triton_paged", 2e-5)])
    fresh = write(tmp_path / "fresh.json", [bench("decode", "triton_paged", 1e-5)])
    merged = baseline.merge_runs([(str(p), load(p)) for p in (stale, fresh)])
    assert [r["file"] for r in merged["machine_info"]["merged_runs"]] == ["fresh.json"]
    assert json.loads(json.dumps(merged))["benchmarks"][0]["stats"]["median"] == 1e-5


@pytest.mark.parametrize(
    "machine, message",
    [(dict(gpu="NVIDIA H200"), "one GPU model"), (dict(gpu=H100, interpreter=True), "one GPU model"),
     (dict(partial=dict(reason="SIGTERM", finished=1, collected=2)), "partial run")],
)
def test_mixed_or_partial_runs_are_refused(tmp_path, capsys, machine, message):
    good = write(tmp_path / "good.json", [bench("decode", "triton_paged", 2e-5)])
    other = write(tmp_path / "other.json", [bench("decode", "sdpa_dense", 2e-5)], **machine)
    out = tmp_path / "baseline.json"
    assert baseline.main([str(out), str(good), str(other)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_an_unwritable_output_is_refused_before_any_run_is_read(tmp_path, capsys):
    run = write(tmp_path / "run.json", [bench("decode", "triton_paged", 2e-5)])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        baseline.main([str(tmp_path / "file" / "baseline.json"), str(run)])
    assert "is not a directory" in capsys.readouterr().err
    assert baseline.main([str(tmp_path / "new" / "dir" / "baseline.json"), str(run)]) == 0
    assert load(tmp_path / "new" / "dir" / "baseline.json")["benchmarks"][0]["stats"]["median"] == 2e-5
