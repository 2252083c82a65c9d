"""benchmarks.report and benchmarks.compare on small synthetic pytest-benchmark JSON files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare, report
from benchmarks.results import ResultsError, load
from tests.benchmark_json import H100, MACHINE, bench, write

ROOT = Path(__file__).parents[1]


def runs(
    tmp_path: Path, scale: dict[str, float], base_machine: dict | None = None, new_machine: dict | None = None
) -> tuple[str, str]:
    """A baseline of three benchmarks and a new run whose medians are the baseline's times `scale[impl]` (default 1)."""
    impls = {"flash_triton": 1.1e-3, "sdpa_cudnn": 0.9e-3, "sdpa_flash": 1.3e-3}
    base = [bench("prefill", impl, median) for impl, median in impls.items()]
    new = [bench("prefill", impl, median * scale.get(impl, 1.0)) for impl, median in impls.items() if scale.get(impl) != 0]
    return str(write(tmp_path / "base.json", base, **(base_machine or {}))), str(
        write(tmp_path / "new.json", new, **(new_machine or {}))
    )


def test_compare_catches_a_20_percent_slowdown(tmp_path, capsys):
    assert compare.main([*runs(tmp_path, {"flash_triton": 1.2}), "--threshold", "10%"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "+20.0%" in out
    assert "FAIL" in out and "test_prefill[flash_triton" in out.split("FAIL")[-1]


def test_compare_gates_only_the_named_impls(tmp_path, capsys):
    # A noisy host-bound reference slowed 50%: out of the gate when only the kernels are named.
    assert compare.main([*runs(tmp_path, {"sdpa_flash": 1.5}), "--impl", "flash_triton", "--impl", "sdpa_cudnn"]) == 0
    out = capsys.readouterr().out
    assert "sdpa_flash" not in out and "(2 compared)" in out
    assert compare.main([*runs(tmp_path, {"sdpa_flash": 1.5}), "--impl", "sdpa_flash"]) == 1


def test_compare_refuses_an_impl_neither_file_has(tmp_path, capsys):
    """A typo in --impl once filtered every benchmark out and passed the gate."""
    assert compare.main([*runs(tmp_path, {}), "--impl", "flash_triton", "--impl", "flash_trton"]) == 2
    err = capsys.readouterr().err
    assert "--impl 'flash_trton'" in err and "present: flash_triton, sdpa_cudnn, sdpa_flash" in err


@pytest.mark.parametrize("extra", [[], ["--allow-missing"], ["--impl", "triton_paged"], ["--impl", "triton_paged", "--allow-missing"]])
def test_compare_refuses_when_nothing_is_compared(tmp_path, capsys, extra):
    """Disjoint runs (or an --impl only one file has) compare nothing, which is no pass."""
    base = str(runs(tmp_path, {})[0])
    new = str(write(tmp_path / "decode.json", [bench("decode", "triton_paged", 1e-4)]))
    assert compare.main([base, new, *extra]) == 2
    out, err = capsys.readouterr()
    assert "no benchmark appears in both files" in out and "error: nothing compared" in err


@pytest.mark.parametrize("scale", [1.03, 0.97, 0.5])
def test_compare_passes_wobble_and_speedups(tmp_path, capsys, scale):
    assert compare.main([*runs(tmp_path, {"flash_triton": scale}), "--threshold", "10"]) == 0
    assert "REGRESSION" not in capsys.readouterr().out


def test_compare_field_and_threshold_are_honoured(tmp_path):
    files = runs(tmp_path, {"flash_triton": 1.2})
    assert compare.main([*files, "--threshold", "25%"]) == 0
    assert compare.main([*files, "--threshold", "10%", "--field", "min"]) == 1


def test_compare_refuses_different_gpus_unless_allowed(tmp_path, capsys):
    files = runs(tmp_path, {}, new_machine=dict(gpu="NVIDIA H200"))
    assert compare.main(files) == 2
    err = capsys.readouterr().err
    assert H100 in err and "NVIDIA H200" in err
    assert compare.main([*files, "--allow-different-gpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "WARNING" in lines[1] and "WARNING" in lines[-2]


def test_compare_refuses_interpreter_against_compiled(tmp_path, capsys):
    files = runs(tmp_path, {}, base_machine=dict(interpreter=True))
    assert compare.main(files) == 2
    assert "interpreter" in capsys.readouterr().err
    assert compare.main([*files, "--allow-different-gpu"]) == 0


def test_compare_fails_on_a_vanished_benchmark_unless_allowed(tmp_path, capsys):
    files = runs(tmp_path, {"sdpa_flash": 0})
    assert compare.main(files) == 1
    assert "test_prefill[sdpa_flash" in capsys.readouterr().out.split("MISSING FROM NEW")[-1]
    assert compare.main([*files, "--allow-missing"]) == 0


def test_compare_files_returns_the_verdict_as_data(tmp_path):
    """What slurm.merge reads instead of compare's printout: the rows, the regressions, what only
    one file holds, the exit status; refusals raise ResultsError."""
    base, new = runs(tmp_path, {"flash_triton": 1.2, "sdpa_flash": 0})
    result = compare.compare_files(base, new, threshold=10)
    slower, vanished = (bench("prefill", impl, 1.0)["fullname"] for impl in ("flash_triton", "sdpa_flash"))
    assert result.code == 1 and [r[0] for r in result.rows] == [slower, bench("prefill", "sdpa_cudnn", 1.0)["fullname"]]
    assert [r.split(": ")[0].strip() for r in result.regressions] == [slower] and result.missing == [vanished] and result.added == []
    assert result.error is None and "FAIL: 1 benchmark(s)" in compare.render(result)
    assert compare.compare_files(base, new, impls=["sdpa_cudnn"]).code == 0
    with pytest.raises(ResultsError, match="different GPUs"):
        compare.compare_files(base, str(write(tmp_path / "h200.json", [bench("prefill", "flash_triton", 1e-3)], gpu="NVIDIA H200")))


@pytest.mark.parametrize("median", [0.0, -1.1e-3])
def test_compare_refuses_a_time_that_is_not_positive(tmp_path, capsys, median):
    """A zero baseline once gave an 'inf' ratio, and negative times a +100% 'regression' for a
    figure that halved; history add refuses such a file with the same check."""
    base, new = runs(tmp_path, {})
    data = json.loads(Path(base).read_text())
    data["benchmarks"][0]["stats"]["median"] = median
    Path(base).write_text(json.dumps(data))
    assert compare.main([base, new]) == 2
    assert f"has no positive stats.median (it has {median!r})" in capsys.readouterr().err


def test_report_plot_naming_a_file_is_a_usage_error(tmp_path, capsys):
    taken = tmp_path / "plots"
    taken.write_text("")
    with pytest.raises(SystemExit) as exc:
        report.main([str(known_report(tmp_path)), "--plot", str(taken)])
    assert exc.value.code == 2 and f"--plot: {taken} is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module, option, value, message",
    [
        ("tune", "--json", "{d}", "{d} is a directory, not a file"),
        ("tune", "--out", "{d}/file", "{d}/file is not a directory"),
        ("compile_check", "--json", "{d}/file/rows.json", "{d}/file is not a directory"),
        ("report", "--plot", "{d}/file", "{d}/file is not a directory"),
    ],
)
def test_tools_refuse_an_output_path_when_parsing_not_after_the_work(tmp_path, capsys, module, option, value, message):
    """The tuner and the compile check wrote their --json only after minutes of work; a bad path then lost every row."""
    import importlib

    (tmp_path / "file").write_text("")
    args = [str(known_report(tmp_path))] if module == "report" else []
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"benchmarks.{module}").main([*args, option, value.format(d=tmp_path)])
    assert exc.value.code == 2 and f"argument {option}: {message.format(d=tmp_path)}" in capsys.readouterr().err


def test_report_render_returns_the_text_and_what_it_wrote(tmp_path):
    path = known_report(tmp_path)
    rendered = report.render([(path, load(path))], plot=tmp_path / "plots")
    assert rendered.tables == 2 and "## prefill" in rendered.text and "## decode" in rendered.text
    assert sorted(rendered.figures) == sorted((tmp_path / "plots").iterdir()) and len(rendered.figures) == 2
    assert report.render([(path, load(path))], suite="engine").tables == 0


@pytest.mark.parametrize("bad", ["ten", "10.5%", "-5", "%"])
def test_compare_rejects_a_bad_threshold(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        compare.main([*runs(tmp_path, {}), "--threshold", bad])
    assert exc.value.code == 2 and "invalid threshold" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["not json", "[]", '{"benchmarks": []}', '{"benchmarks": [{"name": "x"}]}'])
def test_both_tools_reject_malformed_input(tmp_path, capsys, content):
    (tmp_path / "bad.json").write_text(content)
    good = runs(tmp_path, {})[0]
    assert compare.main([good, str(tmp_path / "bad.json")]) == 2
    assert report.main([str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_compare_module_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", *runs(tmp_path, {"sdpa_cudnn": 1.5})],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "test_prefill[sdpa_cudnn" in proc.stdout.split("FAIL")[-1]


def known_report(tmp_path: Path, **machine) -> Path:
    """flash_triton at 400 TFLOP/s (50% of 800), cuDNN 1.25× faster, SDPA-flash slower; decode paged against dense."""
    flash = bench("prefill", "flash_triton", 1.0)
    median = flash["extra_info"]["flops"] / 400e12
    benches = [
        bench("prefill", "flash_triton", median),
        bench("prefill", "sdpa_cudnn", 0.8 * median),
        bench("prefill", "sdpa_flash", 1.5 * median),
        bench("prefill", "flash_triton", median, size=1024, batch=16),
        bench("decode", "triton_paged", 2.4e-5, size=2048),
        bench("decode", "sdpa_dense", 1.4e-5, size=2048),
        bench("decode", "triton_paged", 4.4e-5, size=4096),
        bench("sampling", "e2e", 1.0),
    ]
    return write(tmp_path / "out.json", benches, **machine)


def table_rows(text: str) -> list[list[str]]:
    """The stripped cells of each body row of the first pipe table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_report_table_cells_and_speedups(tmp_path, capsys):
    assert report.main([str(known_report(tmp_path))]) == 0
    out = capsys.readouterr().out
    prefill, decode = out.split("## prefill")[1].split("## decode")
    header = prefill.splitlines()[2]
    for column in ("flash_triton", "sdpa_cudnn", "sdpa_flash", "flash_triton vs sdpa"):
        assert f" {column} " in header
    rows = {cells[4]: cells for cells in table_rows(prefill)}
    assert rows["4096"][8:] == ["400.0 (50%)", "266.7 (33%)", "500.0 (62%)", "0.80× sdpa_cudnn"]
    assert rows["1024"][8:] == ["100.0 (12%)", "–", "–", "–"]  # no SDPA in that row, so no speedup either
    assert "0.58× sdpa_dense" in decode and "triton_paged vs sdpa" in decode
    assert "sampling (1 benchmarks)" in out and "INTERPRETER" not in out


def test_report_shows_a_dash_for_missing_keys(tmp_path, capsys):
    no_pct, no_rate, no_model = (
        bench("prefill", "flash_triton", 1e-3),
        bench("prefill", "sdpa_cudnn", 1e-3),
        bench("decode", "sdpa_dense", 1e-5),
    )
    del no_pct["extra_info"]["pct_of_ceiling"], no_rate["extra_info"]["tflops"], no_model["extra_info"]["model"]
    assert report.main([str(write(tmp_path / "out.json", [no_pct, no_rate, no_model]))]) == 0
    prefill, decode = capsys.readouterr().out.split("## prefill")[1].split("## decode")
    assert table_rows(prefill)[0][8:] == [f"{no_pct['extra_info']['tflops']:.1f}", "–", "1.00× sdpa_cudnn"]
    assert table_rows(decode)[0][0] == "–"


def test_report_suite_filter_and_interpreter_warning(tmp_path, capsys):
    assert report.main([str(known_report(tmp_path, interpreter=True, gpu="none (CPU)")), "--suite", "decode"]) == 0
    out = capsys.readouterr().out
    assert "TRITON INTERPRETER TIMINGS ON CPU" in out
    assert "## decode" in out and "## prefill" not in out


def test_report_plots_one_png_per_group(tmp_path, capsys, monkeypatch):
    replaced, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (real(src, dst), replaced.append(Path(dst))))
    assert report.main([str(known_report(tmp_path)), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    # A figure per (model, tp, dtype[, block]); causal and batch are panels inside it.
    assert pngs == ["decode_qwen3-8b_tp1_bfloat16_block16.png", "prefill_qwen3-8b_tp1_bfloat16.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert f"wrote {tmp_path / 'plots' / name}" in out
    assert sorted(p.name for p in replaced) == pngs  # each written atomically


def test_report_without_shown_suite_fails(tmp_path):
    path = write(tmp_path / "sampling.json", [bench("sampling", "e2e", 1.0)])
    assert report.main([str(path)]) == 1


def test_report_puts_the_engine_against_transformers(tmp_path, capsys):
    benches = []
    for impl, wall, pct in (("minivllm", 8.0, 70.0), ("hf_transformers", 100.0, 5.6)):
        b = bench("engine", impl, wall)
        b["extra_info"].update(workload="nano", num_seqs=256, max_len=1024, tokens_per_s=143_000 / wall, pct_of_ceiling=pct)
        benches.append(b)
    latency = dict(ttft_ms={"p50": 340.0, "p90": 540.0, "p99": 548.0}, itl_ms={"p50": 6.42, "p90": 6.84, "p99": 14.4}, preemptions=3, prefix_hit_rate=0.775,
                   one_row_step_ms=1.42, weight_read_ms=0.37)
    benches[0]["extra_info"].update(latency)
    assert report.main([str(write(tmp_path / "engine.json", benches))]) == 0
    out = capsys.readouterr().out
    table, latencies = out.split("## engine")[1], out.split("## engine latency")[1]
    (row,) = table_rows(table)  # both impls share one row: the block size is not part of it
    assert row[3:5] == ["nano", "256"]
    assert row[-3:] == ["17875.0 (70%)", "1430.0 (5.6%)", "12.50× hf_transformers"]
    (row,) = table_rows(latencies)  # transformers records no latencies
    assert row[3:] == ["nano", "256", "minivllm", "340", "540", "548", "6.4", "6.8", "14.4", "3", "78%", "1.42 (3.8× weights)"]


def test_report_puts_each_step_bucket_against_its_floor(tmp_path, capsys):
    """One row per (phase, batch bucket) of a run's step summary; a row above its floor is flagged,
    and so is one whose steps compiled kernels (a summary from before compiles were counted: '–')."""
    b = bench("engine", "minivllm", 8.0)
    steps = [dict(phase="decode", batch_up_to=256, steps=492, total_s=3.862, floor_s=3.1, pct_floor=80.27, host_share=0.219, compiles=0),
             dict(phase="prefill", batch_up_to=256, steps=9, total_s=0.467, floor_s=0.5, pct_floor=107.1, host_share=0.94, compiles=1),
             dict(phase="decode", batch_up_to=512, steps=1, total_s=0.01, floor_s=0.005, pct_floor=50.0, host_share=0.5)]
    b["extra_info"].update(workload="nano", num_seqs=256, max_len=1024, tokens_per_s=1000.0, pct_of_ceiling=70.0, steps=steps)
    assert report.main([str(write(tmp_path / "engine.json", [b]))]) == 0
    rows = table_rows(capsys.readouterr().out.split("## engine steps")[1])
    assert [row[4:] for row in rows] == [
        ["decode", "256", "492", "3.862", "3.100", "80%", "22%", "0"], ["prefill", "256", "9", "0.467", "0.500", "107% [!]", "94%", "1 [jit]"],
        ["decode", "512", "1", "0.010", "0.005", "50%", "50%", "–"],
    ]


def test_report_flags_a_figure_that_beats_its_bound(tmp_path, capsys):
    """112% of a roofline (the shared-prefix row before its floor was fixed) is a wrong floor, flagged
    in its cell and under the table; 100% is not."""
    benches = []
    for workload, pct in (("shared_prefix", 112.3), ("nano", 100.0)):
        b = bench("engine", "minivllm", 8.0)
        b["extra_info"].update(workload=workload, num_seqs=256, max_len=1024, tokens_per_s=1000.0, pct_of_ceiling=pct, ceiling="roofline")
        benches.append(b)
    assert report.main([str(write(tmp_path / "engine.json", benches))]) == 0
    table = capsys.readouterr().out.split("## engine")[1]
    assert sorted(c for row in table_rows(table) for c in row if c.startswith("1000.0")) == ["1000.0 (100%)", "1000.0 (112%) [!]"]
    assert "!!! BROKEN BOUND: 1 figure(s) above 100% of roofline [!]" in table


def test_report_puts_paged_prefix_against_contiguous(tmp_path, capsys):
    benches = [bench("prefill", impl, median) for impl, median in (("flash_triton", 1e-3), ("flash_triton_paged16", 1.25e-3), ("flash_triton_paged256", 1.05e-3))]
    for b in benches:
        b["extra_info"]["suite"] = "prefix"
    assert report.main([str(write(tmp_path / "prefix.json", benches))]) == 0
    table = capsys.readouterr().out.split("## prefix")[1]
    assert "'vs contiguous' = fastest contiguous median / ours" in table
    (row,) = table_rows(table)
    assert row[-2:] == ["0.80× flash_triton", "0.95× flash_triton"]


def test_report_names_the_read_ceiling_of_decode_and_draws_it(tmp_path, capsys):
    benches = [bench("decode", "triton_paged", 2.4e-5, size=2048), bench("decode", "sdpa_dense", 1.4e-5, size=2048)]
    path = write(tmp_path / "decode.json", benches)
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "read_gbps=3200.0" in out and "## decode: GB/s (% of read_gbps)" in out
    (row,) = table_rows(out.split("## decode")[1])
    gbps = benches[1]["extra_info"]["gbps"]
    assert row[-2] == f"{gbps:.1f} ({100 * gbps / 3200:.0f}%)"
    fig = report.figure(benches, report.SUITES["decode"], json.loads(path.read_text())["machine_info"], "t")
    (line,) = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label().startswith("ceiling")]
    assert line.get_label() == "ceiling (read_gbps)" and list(line.get_ydata()) == [3200.0, 3200.0]


def test_report_of_a_file_from_before_the_read_ceiling(tmp_path, capsys):
    """Old files recorded decode against copy_gbps and have no read_gbps: the title and the plot
    say copy_gbps, the header a dash; a figure whose ceiling is missing draws no line."""
    old = bench("decode", "triton_paged", 2.4e-5)
    old["extra_info"].update(ceiling="copy_gbps", pct_of_ceiling=50.0)
    machine = {k: v for k, v in MACHINE.items() if k != "read_gbps"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(dict(machine_info=machine, benchmarks=[old])))
    assert report.main([str(path), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "read_gbps=–" in out and "(% of copy_gbps)" in out and "(50%)" in out
    fig = report.figure([old], report.SUITES["decode"], machine, "t")
    assert [ln.get_label() for ax in fig.axes for ln in ax.get_lines()][-1] == "ceiling (copy_gbps)"
    new = bench("decode", "triton_paged", 2.4e-5)  # records read_gbps, which this machine lacks
    fig = report.figure([new], report.SUITES["decode"], machine, "t")
    assert not [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label().startswith("ceiling")]


def sourced(suite: str, impl: str, median: float, source: str | None, **kw) -> dict:
    b = bench(suite, impl, median, **kw)
    if source is not None:
        b["extra_info"]["config_source"] = source
    return b


def test_report_shows_where_triton_configs_came_from(tmp_path, capsys):
    benches = [
        sourced("prefill", "flash_triton", 1e-3, "table", size=1024),
        sourced("prefill", "flash_triton", 1e-3, "family", size=2048),
        sourced("prefill", "flash_triton", 2e-3, "heuristic", size=4096),  # under 100% of the ceiling
        sourced("prefill", "flash_triton", 1e-2, "other group", size=8192),
        sourced("prefill", "sdpa_cudnn", 1e-3, None, size=4096),
        sourced("decode", "triton_paged", 2e-5, "table", size=2048),
        sourced("decode", "triton_paged", 2e-5, "table", size=4096),
    ]
    assert report.main([str(write(tmp_path / "mixed.json", benches))]) == 0
    out = capsys.readouterr().out
    banner = "!!! UNTUNED TRITON CONFIGS: 3 of 6 Triton benchmarks (other group 1, family 1, heuristic 1) ran without this GPU's tuning for their shape"
    assert banner in out and out.index(banner) < out.index("## prefill")
    prefill, decode = out.split("## prefill")[1].split("## decode")
    cells = {row[4]: row[8] for row in table_rows(prefill)}
    assert cells["1024"].endswith("%)") and cells["2048"].endswith("%) [F]") and cells["4096"].endswith("%) [H]") and cells["8192"].endswith("%) [G]")
    assert "config source: flash_triton table 1, other group 1, family 1, heuristic 1 ([G] other group" in prefill
    assert "config source: triton_paged table 2\n" in decode + "\n" and not any(m in decode for m in ("[G]", "[F]", "[H]"))
    assert report.main([str(tmp_path / "mixed.json"), "--suite", "decode"]) == 0
    assert "UNTUNED" not in capsys.readouterr().out  # the untuned benchmarks are all in the suite not shown


def test_report_says_nothing_of_config_sources_none_recorded(tmp_path, capsys):
    assert report.main([str(known_report(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "config source" not in out and "UNTUNED" not in out and "[H]" not in out


def test_report_plot_titles_an_untuned_group(tmp_path, monkeypatch):
    titles = []
    real = report.figure

    def spy(members, suite, machine, title):
        titles.append(title)
        return real(members, suite, machine, title)

    monkeypatch.setattr(report, "figure", spy)
    benches = [sourced("decode", "triton_paged", 2e-5, "heuristic", block_size=16), sourced("decode", "triton_paged", 2e-5, "table", block_size=256)]
    report.plot_suite(benches, "decode", report.SUITES["decode"], MACHINE, tmp_path, [])
    assert [t.count("UNTUNED CONFIGS: 1 of 1 Triton benchmarks (heuristic 1)") for t in titles] == [1, 0]
