"""Tables (and optional plots) of benchmark results: configuration × implementation, per suite.

    python -m benchmarks.report OUT.json [more.json ...] [--suite prefill|prefix|decode|cascade|engine] [--plot DIR]

Each cell is the throughput the benchmark recorded and its % of the machine's ceiling, the one its
extra_info["ceiling"] names (decode: read_gbps; files from before that ceiling existed recorded
copy_gbps, and the table's title says which); the speedup columns put each of our Triton kernels
against the fastest SDPA backend measured on the same row.

Triton benchmarks record extra_info["config_source"]: "table" when the launch configs came from
this GPU's tuning table, "other group" when from its entries tuned at another GQA group (a model
whose heads were not tuned), "family" when from a related card's table, "heuristic" when from the
kernels' defaults. A cell that ran untuned is marked [G], [F] or [H], each table ends with the count
per source, and a file with any untuned benchmark opens with a warning. Files from before the
tables, and non-Triton impls, record none and show none.
"""

import argparse
import io
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.output_paths import output_dir
from benchmarks.results import DASH, ResultsError, fmt, is_interpreter, load, machine_lines, number, pipe_table
from minivllm.atomic_write import write_atomic

# Columns in this order; an impl not listed here goes after these, alphabetically.
IMPL_ORDER = ("torch_standard", "torch_loop", "torch_gather", "naive_triton", "flash_triton", "flash_triton_paged16", "flash_triton_paged256", "triton_paged", "triton_cascade", "minivllm")
OURS = ("naive_triton", "flash_triton", "triton_paged")
PEERS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_dense")
# config_source values in the order shown; "table" is the tuned case, so only the others mark a cell.
CONFIG_SOURCES = ("table", "other group", "family", "heuristic")
UNTUNED_MARKS = {"other group": "G", "family": "F", "heuristic": "H"}
UNTUNED_MEANING = {"other group": "this card's entries tuned at another GQA group", "family": "another card's table", "heuristic": "the kernels' defaults"}


@dataclass(frozen=True)
class Suite:
    """How one suite's extra_info reads: its size axis, its extra config column, its throughput and
    ceiling; and which impls its speedup columns put against which ('ours vs <versus>')."""

    size: str
    mode: str
    throughput: str
    unit: str
    ceiling: str
    group: tuple[str, ...]  # one figure per distinct value of these
    panel: str  # one panel of that figure per distinct value of this
    ours: tuple[str, ...] = OURS
    peers: tuple[str, ...] = PEERS
    versus: str = "sdpa"


SUITES = {
    "prefill": Suite("seqlen", "causal", "tflops", "TFLOP/s", "matmul_tflops", ("model", "tp", "dtype"), "causal"),
    "prefix": Suite(
        "seqlen", "causal", "tflops", "TFLOP/s", "matmul_tflops", ("model", "tp", "dtype"), "causal",
        ours=("flash_triton_paged16", "flash_triton_paged256"), peers=("flash_triton",), versus="contiguous",
    ),
    "decode": Suite("context_len", "block_size", "gbps", "GB/s", "read_gbps", ("model", "tp", "dtype", "block_size"), "batch"),
    # GB/s of the least a shared-prefix step must read (benchmarks/test_cascade.py), for both impls.
    "cascade": Suite(
        "shared_len", "block_size", "gbps", "GB/s", "read_gbps", ("model", "tp", "dtype", "block_size"), "batch",
        ours=("triton_cascade",), peers=("triton_paged",), versus="plain",
    ),
    # The engine's "% of ceiling" is of the workload's roofline time (benchmarks/extra_info.py, engine_floor_s).
    "engine": Suite(
        "num_seqs", "workload", "tokens_per_s", "tok/s", "roofline", ("model", "tp", "dtype"), "num_seqs",
        ours=("minivllm",), peers=("hf_transformers",), versus="transformers",
    ),
}
PREFIXES = {"tp": "tp", "block_size": "block", "batch": "batch"}


def sort_key(values: tuple) -> tuple:
    """Order config tuples numerically where values are numbers, textually otherwise, missing values last."""
    return tuple((v is None, number(v) or 0.0, str(v)) for v in values)


def config_key(extra: dict, suite: Suite) -> tuple:
    """The row a benchmark belongs to, in sort order: model, tp, dtype, mode, size, batch, heads, head_dim."""
    fields = ("model", "tp", "dtype", suite.mode, suite.size, "batch", "num_heads", "num_kv_heads", "head_dim")
    return tuple(extra.get(f) for f in fields)


def impl_of(bench: dict) -> str:
    """The benchmark's implementation name, a dash when it records none."""
    return str(bench["extra_info"].get("impl", DASH))


def impl_columns(impls: set[str]) -> list[str]:
    """The impls present: the torch baselines, then ours, then the SDPA peers, then anything unknown."""
    known = [i for i in IMPL_ORDER + PEERS if i in impls]
    return known + sorted(impls - set(known))


def beats_its_bound(bench: dict) -> bool:
    """True when the benchmark recorded more than 100% of its ceiling or floor: the bound's count
    is wrong, since nothing measured can beat a true bound."""
    pct = number(bench["extra_info"].get("pct_of_ceiling"))
    return pct is not None and pct > 100


def cell(bench: dict, suite: Suite) -> str:
    """'452.1 (56%)': the recorded throughput and its recorded % of ceiling, then ' [H]' or ' [F]'
    when its configs came from the heuristics or another card's table, and ' [!]' when it beats
    its bound."""
    extra = bench["extra_info"]
    throughput, pct = number(extra.get(suite.throughput)), number(extra.get("pct_of_ceiling"))
    if throughput is None:
        return DASH
    marks = [m for m in (UNTUNED_MARKS.get(extra.get("config_source")), "!" if beats_its_bound(bench) else None) if m]
    return fmt(throughput, 1) + (f" ({fmt(pct, 0)}%)" if pct is not None else "") + "".join(f" [{m}]" for m in marks)


def ceiling_names(benches: list[dict], suite: Suite) -> str:
    """The ceiling(s) the benchmarks' % figures are of, as they recorded them ('read_gbps'; an old
    file's decode says 'copy_gbps'), or the suite's own when none recorded one."""
    names = dict.fromkeys(str(b["extra_info"]["ceiling"]) for b in benches if b["extra_info"].get("ceiling"))
    return ", ".join(names) or suite.ceiling


def source_counts(benches: list[dict]) -> dict[str, Counter]:
    """{impl: Counter of config_source} over the benchmarks that recorded one."""
    counts: dict[str, Counter] = {}
    for bench in benches:
        source = bench["extra_info"].get("config_source")
        if source is not None:
            counts.setdefault(impl_of(bench), Counter())[str(source)] += 1
    return counts


def ordered(counts: Counter) -> str:
    """'table 10, heuristic 2': in CONFIG_SOURCES order, any other value after, alphabetically."""
    keys = [s for s in CONFIG_SOURCES if s in counts] + sorted(set(counts) - set(CONFIG_SOURCES))
    return ", ".join(f"{s} {counts[s]}" for s in keys)


def config_line(benches: list[dict]) -> str:
    """'config source: flash_triton table 10, heuristic 2; triton_paged table 12', or '' when no
    benchmark recorded a source."""
    counts = source_counts(benches)
    if not counts:
        return ""
    parts = [f"{impl} {ordered(counts[impl])}" for impl in impl_columns(set(counts))]
    present = {source for c in counts.values() for source in c}
    legend = "; ".join(f"[{mark}] {source}: {UNTUNED_MEANING[source]}" for source, mark in UNTUNED_MARKS.items() if source in present)
    return "config source: " + "; ".join(parts) + (f" ({legend})" if legend else "")


def untuned(benches: list[dict]) -> str:
    """'3 of 14 Triton benchmarks (family 1, heuristic 2)': those whose configs were not tuned on
    this GPU, or '' when there are none."""
    sources = sum(source_counts(benches).values(), Counter())
    bad = Counter({s: n for s, n in sources.items() if s != "table"})
    return f"{bad.total()} of {sources.total()} Triton benchmarks ({ordered(bad)})" if bad else ""


def speedup(row: dict[str, dict], impl: str, suite: Suite) -> str:
    """'0.71× sdpa_cudnn': the fastest peer's median time over ours (above 1 means ours is faster)."""
    ours = number(row[impl]["stats"].get("median")) if impl in row else None
    peers = [(number(row[p]["stats"].get("median")), p) for p in suite.peers if p in row]
    peers = [(t, p) for t, p in peers if t is not None]
    if not ours or not peers:
        return DASH
    best_time, best = min(peers)
    return f"{fmt(best_time / ours, 2)}× {best}"


def suite_table(benches: list[dict], name: str, suite: Suite) -> str:
    """One suite's table: a row per configuration, a column per impl, then a speedup column per Triton impl."""
    rows: dict[tuple, dict[str, dict]] = {}
    duplicates = 0
    for bench in benches:
        row = rows.setdefault(config_key(bench["extra_info"], suite), {})
        impl = impl_of(bench)
        duplicates += impl in row
        row.setdefault(impl, bench)
    impls = impl_columns({impl for row in rows.values() for impl in row})
    ours = [i for i in suite.ours if i in impls]
    mode = {"causal": "causal", "block_size": "block"}.get(suite.mode, suite.mode)
    headers = ["model", "tp", "dtype", mode, suite.size, "batch", "heads q/kv", "d", *impls, *(f"{i} vs {suite.versus}" for i in ours)]
    body = []
    for key in sorted(rows, key=sort_key):
        model, tp, dtype, mode_value, size, batch, heads, kv_heads, head_dim = key
        if suite.mode == "causal":
            mode_value = {True: "yes", False: "no"}.get(mode_value, mode_value)
        config = [fmt(v) for v in (model, tp, dtype, mode_value, size, batch)] + [f"{fmt(heads)}/{fmt(kv_heads)}", fmt(head_dim)]
        row = rows[key]
        body.append(config + [cell(row[i], suite) if i in row else DASH for i in impls] + [speedup(row, i, suite) for i in ours])
    title = f"## {name}: {suite.unit} (% of {ceiling_names(benches, suite)}); 'vs {suite.versus}' = fastest {suite.versus} median / ours"
    lines = [f"{title}\n", pipe_table(headers, body, right=set(range(4, len(headers)))), config_line(benches)]
    if duplicates:
        lines.append(f"note: {duplicates} benchmark(s) repeat a row and impl already shown; the first is kept")
    broken = sum(beats_its_bound(b) for b in benches)
    if broken:
        lines.append(f"!!! BROKEN BOUND: {broken} figure(s) above 100% of {ceiling_names(benches, suite)} [!]; a bound that a measurement beats counts wrong (benchmarks/extra_info.py)")
    return "\n".join(filter(None, lines))


def latency_table(benches: list[dict]) -> str:
    """The engine runs' serving latencies (benchmarks/extra_info.py, record_latency): a row per run
    that recorded them; '' when none did. The last column is the median one-sequence decode step
    over one step's weight reads at the read ceiling."""
    rows = []
    for bench in sorted(benches, key=lambda b: sort_key(config_key(b["extra_info"], SUITES["engine"]))):
        extra = bench["extra_info"]
        if "ttft_ms" not in extra:
            continue
        ttft, itl = extra["ttft_ms"], extra["itl_ms"]
        rate = number(extra.get("prefix_hit_rate"))
        rows.append(
            [fmt(extra.get(f)) for f in ("model", "tp", "dtype", "workload", "num_seqs")] + [impl_of(bench)]
            + [fmt(ttft.get(q), 0) for q in ("p50", "p90", "p99")] + [fmt(itl.get(q), 1) for q in ("p50", "p90", "p99")]
            + [fmt(extra.get("preemptions")), DASH if rate is None else f"{100 * rate:.0f}%", one_row_step(extra)]
        )
    if not rows:
        return ""
    headers = ["model", "tp", "dtype", "workload", "num_seqs", "impl", "TTFT p50 ms", "p90", "p99", "ITL p50 ms", "p90", "p99", "preempted", "prefix hits",
               "1-row step ms"]
    return "## engine latency: time to first token per request, and inter-token gaps over all requests\n\n" + pipe_table(headers, rows, right=set(range(6, len(headers))))


def steps_table(benches: list[dict]) -> str:
    """Where each engine run's time went against its floor: a row per (phase, batch bucket) of
    its step summary (benchmarks/extra_info.py, step_floors); '' when no run has one. A row above
    100% of its floor is marked [!]: that floor counts wrong. A row whose steps compiled Triton
    kernels is marked [jit]: its time holds compiling, not serving (a warm-up that missed a
    variant)."""
    rows = []
    for bench in sorted(benches, key=lambda b: sort_key(config_key(b["extra_info"], SUITES["engine"]))):
        extra = bench["extra_info"]
        for step in extra.get("steps") or ():
            if "floor_s" not in step:
                continue
            pct = number(step.get("pct_floor"))
            rows.append(
                [fmt(extra.get(f)) for f in ("model", "tp", "dtype", "workload")]
                + [step["phase"], fmt(step["batch_up_to"]), fmt(step["steps"]), fmt(step["total_s"], 3), fmt(step["floor_s"], 3)]
                + [DASH if pct is None else f"{pct:.0f}%" + (" [!]" if pct > 100 else ""), f"{100 * step['host_share']:.0f}%"]
                + [fmt(step.get("compiles")) + (" [jit]" if step.get("compiles") else "")]
            )
    if not rows:
        return ""
    headers = ["model", "tp", "dtype", "workload", "phase", "batch ≤", "steps", "s", "floor s", "% of floor", "host %", "compiles"]
    return ("## engine steps: each phase and batch bucket's time against its floor (the steps as scheduled)\n\n"
            + pipe_table(headers, rows, right=set(range(5, len(headers)))))


def one_row_step(extra: dict) -> str:
    """'1.42 (3.8× weights)': the median one-sequence decode step and its multiple of the weights'
    read time; '—' for a run with no such step."""
    step, floor = number(extra.get("one_row_step_ms")), number(extra.get("weight_read_ms"))
    if step is None:
        return DASH
    return f"{step:.2f}" + (f" ({step / floor:.1f}× weights)" if floor else "")


def size_label(size: float) -> str:
    """Tick labels 512, 1k, 2k, 1.5k: sizes in units of 1024 once they reach it."""
    return f"{size / 1024:g}k" if size >= 1024 else f"{size:g}"


def label(field: str, value) -> str:
    """One group or panel value as a word: 'causal', 'noncausal', 'tp1', 'block16', 'batch4', 'bfloat16'."""
    if field == "causal":
        return {True: "causal", False: "noncausal"}.get(value, fmt(value))
    return PREFIXES.get(field, "") + fmt(value)


def draw(ax, members: list[dict], suite: Suite, colors: dict[str, str], ceiling_key: str, ceiling: float | None) -> None:
    """One panel: throughput against size on a log2 axis, a line per impl in its figure-wide color,
    the ceiling dashed."""
    from matplotlib.ticker import NullLocator

    by_impl: dict[str, list[tuple[float, float]]] = {}
    for bench in members:
        x, y = number(bench["extra_info"].get(suite.size)), number(bench["extra_info"].get(suite.throughput))
        if x and y is not None:
            by_impl.setdefault(impl_of(bench), []).append((x, y))
    for impl in impl_columns(set(by_impl)):
        ax.plot(*zip(*sorted(by_impl[impl]), strict=True), marker="o", label=impl, color=colors[impl])
    sizes = sorted({x for points in by_impl.values() for x, _ in points})
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [size_label(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
    if ceiling:
        ax.axhline(ceiling, linestyle="--", color="grey", label=f"ceiling ({ceiling_key})")
        # The legend names the ceiling; its figure sits on the line, where the eye compares against it.
        ax.annotate(f"{fmt(ceiling, 0)} {suite.unit}", (0.99, ceiling), xycoords=ax.get_yaxis_transform(), ha="right", va="bottom")
    ax.set(xlabel=suite.size)
    ax.grid(alpha=0.3)


def figure(members: list[dict], suite: Suite, machine: dict, title: str):
    """One group's figure: a panel per value of `suite.panel` side by side, sharing the y axis."""
    # Imported here so the tables need no matplotlib; the Agg canvas renders without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict = {}
    for bench in members:
        panels.setdefault(bench["extra_info"].get(suite.panel), []).append(bench)
    keys = sorted(panels, key=lambda v: sort_key((v,)))
    fig = Figure(figsize=(1 + 3.8 * len(keys), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), sharey=True, squeeze=False)[0]
    ceiling_key = next((b["extra_info"]["ceiling"] for b in members if b["extra_info"].get("ceiling")), suite.ceiling)
    ceiling = number(machine.get(ceiling_key))
    # An impl keeps its color in every panel, even where it was skipped in some.
    colors = {impl: f"C{i}" for i, impl in enumerate(impl_columns({impl_of(b) for b in members}))}
    for ax, key in zip(axes, keys, strict=True):
        draw(ax, panels[key], suite, colors, ceiling_key, ceiling)
        ax.set_title(label(suite.panel, key))
    # Headroom above the ceiling so its label clears the frame.
    axes[0].set_ylim(0, max(axes[0].get_ylim()[1], 1.08 * (ceiling or 0)))
    axes[0].set_ylabel(suite.unit)
    # One legend for the figure, drawn where the first panel has every impl's handle or the most.
    fullest = max(axes, key=lambda ax: len(ax.get_legend_handles_labels()[1]))
    fullest.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def save_figure(fig, path: Path, dpi: int) -> None:
    """Write `fig` as a PNG at `path` atomically: a run killed mid-plot leaves no half-written image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())


def plot_suite(benches: list[dict], name: str, suite: Suite, machine: dict, outdir: Path, prefix: list[str]) -> list[Path]:
    """Write one PNG per group of `suite.group`, named after the group, with `prefix` leading the name."""
    groups: dict[tuple, list[dict]] = {}
    for bench in benches:
        groups.setdefault(tuple(bench["extra_info"].get(f) for f in suite.group), []).append(bench)
    written = []
    for key in sorted(groups, key=sort_key):
        parts = [label(field, value) for field, value in zip(suite.group, key, strict=True)]
        title = f"{name}: {' '.join(parts)} on {machine.get('gpu', 'unknown GPU')}"
        if is_interpreter(machine):
            title += "\nTRITON INTERPRETER ON CPU: not kernel performance"
        if untuned(groups[key]):
            title += f"\nUNTUNED CONFIGS: {untuned(groups[key])}"
        path = outdir / ("_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in [*prefix, name, *parts]) + ".png")
        save_figure(figure(groups[key], suite, machine, title), path, dpi=110)
        written.append(path)
    return written


def file_prefixes(paths: list[Path]) -> list[list[str]]:
    """Words leading each input file's figure names, so several files do not overwrite each other's figures."""
    stems = [path.stem for path in paths]
    if len(stems) == 1:
        return [[]]
    return [[stem] for stem in stems] if len(set(stems)) == len(stems) else [[str(i), stem] for i, stem in enumerate(stems)]


@dataclass
class Rendered:
    """The report of some files: its text (what `report` prints before the figures' paths), how
    many suite tables it holds, and the figures it wrote."""

    text: str
    tables: int
    figures: list[Path]


def render(loaded: list[tuple[Path, dict]], suite: str | None = None, plot: Path | None = None) -> Rendered:
    """The tables for each (path, loaded file) pair, only `suite`'s when given; with `plot`, one
    PNG per group written into that directory."""
    lines, tables, figures = [], 0, []
    for (path, data), prefix in zip(loaded, file_prefixes([p for p, _ in loaded]), strict=True):
        machine = data["machine_info"]
        by_suite: dict[str, list[dict]] = {}
        for bench in data["benchmarks"]:
            by_suite.setdefault(str(bench["extra_info"].get("suite")), []).append(bench)
        chosen = [name for name in SUITES if by_suite.get(name) and suite in (None, name)]
        lines += machine_lines(str(path), machine)
        warning = untuned([b for name in chosen for b in by_suite[name]])
        if warning:
            lines.append(f"!!! UNTUNED TRITON CONFIGS: {warning} ran without this GPU's tuning for their shape (marked [G]/[F]/[H] below) !!!")
        lines.append("")
        for name in chosen:
            lines.append(suite_table(by_suite[name], name, SUITES[name]) + "\n")
            if name == "engine":
                lines += [table + "\n" for table in (latency_table(by_suite[name]), steps_table(by_suite[name])) if table]
            tables += 1
            if plot:
                plot.mkdir(parents=True, exist_ok=True)
                figures += plot_suite(by_suite[name], name, SUITES[name], machine, plot, prefix)
        unknown = {name: len(b) for name, b in by_suite.items() if name not in SUITES}
        if unknown and suite is None:
            lines.append("note: no table for suite(s) " + ", ".join(f"{n} ({c} benchmarks)" for n, c in sorted(unknown.items())) + "\n")
    return Rendered("\n".join(lines), tables, figures)


def main(argv: list[str] | None = None) -> int:
    """Print the tables for each file (and write plots with --plot); 0 when something was shown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--suite", choices=sorted(SUITES), help="show only this suite")
    parser.add_argument("--plot", type=output_dir, metavar="DIR", help="also write one PNG per group into DIR (created if missing)")
    args = parser.parse_args(argv)
    try:
        loaded = [(path, load(path)) for path in args.files]
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rendered = render(loaded, args.suite, args.plot)
    print(rendered.text)
    for path in rendered.figures:
        print(f"wrote {path}")
    if not rendered.tables:
        print(f"error: no {args.suite or 'prefill, prefix, decode or engine'} benchmarks in {', '.join(map(str, args.files))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
