"""Regression history: every benchmark run kept in an SQLite database, its trends, and a gate.

    python -m benchmarks.history add DB RUN.json [RUN.json ...]
    python -m benchmarks.history show DB [-k EXPR] [--gpu NAME] [--last N] [--plot DIR]
    python -m benchmarks.history check DB [--threshold 10%] [--gpu NAME] [--last N]

DB is a file path or an sqlite:/// URL. A run is keyed by its GPU, commit and time (pytest-benchmark's
`datetime`), so adding the same file twice stores it once. Each run is added in one BEGIN IMMEDIATE
transaction with a busy timeout, so several `add`s at once (merge jobs, CI runs) each wait their
turn. The journal stays SQLite's default rollback one, not WAL: WAL needs every writer on one host,
and merge jobs on several nodes write one history on a shared file system. A file is refused whole, as `compare` refuses it, when it holds a
benchmark twice or a median that is not a positive time (benchmarks.results.by_name).
Runs of different GPUs are never compared with each other. `check` compares each GPU's newest run
with the runs before it: a benchmark fails when its median is slower than the median of its
earlier medians by more than the noise band, the larger of --threshold and three times the
history's own spread (the median absolute deviation of those medians, relative to their median).
Exit status: 0 when nothing failed, 1 when something did (each named), 2 for a file or database
that cannot be read or written, or a check that cannot judge: a median in the history that is
not a positive time, a GPU whose newest run has earlier runs but no figure in common with them,
a --gpu the history lacks, or an empty history (a gate that compared nothing has passed nothing).
A GPU's first run, with nothing before it, is not a refusal.
"""

import argparse
import json
import os
import re
import sqlite3
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.compare import threshold
from benchmarks.output_paths import output_dir, writable_dir
from benchmarks.report import SUITES, save_figure
from benchmarks.results import DASH, ResultsError, by_name, fmt_duration, load, number, partial_info, partial_line, pipe_table

MARKER = "minivllm benchmark history"
SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
    id INTEGER PRIMARY KEY, gpu TEXT NOT NULL, commit_id TEXT NOT NULL, time TEXT NOT NULL, source TEXT NOT NULL,
    machine_info TEXT NOT NULL, commit_info TEXT NOT NULL, UNIQUE (gpu, commit_id, time)
)""",
    """CREATE TABLE results (
    run_id INTEGER NOT NULL REFERENCES runs (id), name TEXT NOT NULL, grp TEXT, median REAL, iqr REAL, rounds INTEGER,
    extra_info TEXT NOT NULL, PRIMARY KEY (run_id, name)
)""",
)
# How long a writer waits for another's transaction before giving up. Adding even a whole sweep's
# merged run takes well under a second, so only a stuck writer would exhaust it.
BUSY_TIMEOUT_S = 120
SPREAD_FACTOR = 3  # the band is this many median absolute deviations of the history's medians
THRESHOLD = 10  # percent: the band's floor
LAST = 10  # earlier runs a check compares the newest with


class HistoryError(Exception):
    """A database that is not a history, is damaged, or cannot be read or written."""


def db_path(target: str) -> Path:
    """The file a history target, a path or an sqlite:/// URL, names."""
    return Path(target.removeprefix("sqlite:///"))


@contextmanager
def write_transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. IMMEDIATE takes the write lock at the
    start, so concurrent writers queue on the busy timeout; a deferred transaction would let two
    of them read 'not there yet' and then fail one on the UNIQUE key."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:  # SQLite rolls some failures back itself
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def open_db(target: str, create: bool) -> sqlite3.Connection:
    """The history at `target` (path or sqlite:/// URL); created when `create` (its directory too),
    else it must exist. HistoryError names the file when it
    cannot be opened or written, is damaged, or is another program's database; nothing is reset."""
    path = db_path(target)
    if path.is_dir():
        raise HistoryError(f"{path}: a directory, not a history database")
    if not create and not path.is_file():
        raise HistoryError(f"{path}: no such history database")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every write is an explicit write_transaction.
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        if create:
            with write_transaction(db):  # two first adds at once: one creates the schema, the other sees it
                if not tables(db):
                    for statement in SCHEMA:
                        db.execute(statement)
                    db.execute("INSERT INTO meta VALUES ('format', ?)", (MARKER,))
        found = tables(db)
        if "meta" not in found:
            raise HistoryError(f"{path}: an SQLite database, but not a benchmark history (tables {sorted(found)})")
        marker = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if marker is None or marker[0] != MARKER:
            raise HistoryError(f"{path}: not a benchmark history (no '{MARKER}' marker)")
        db.execute("PRAGMA quick_check").fetchone()
    except (OSError, sqlite3.OperationalError) as exc:  # read-only, locked past the timeout, a directory it cannot make
        raise HistoryError(f"{path}: cannot {'write' if create else 'read'} the history: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise HistoryError(f"{path}: damaged or not an SQLite database: {exc}") from exc
    return db


def check_writable(target: str) -> None:
    """HistoryError when `add` could not store a run at `target`, for a job that will add one only
    later (slurm.submit --history) to refuse now: an existing file must be a history this process
    may write, and its directory (where SQLite keeps its journal) must be one it can write or create."""
    path = db_path(target)
    if path.exists():
        open_db(target, create=False).close()
        if not os.access(path, os.W_OK):
            raise HistoryError(f"{path}: cannot write the history: no write permission")
    problem = writable_dir(path.parent)
    if problem:
        raise HistoryError(f"{path}: {problem}")


def add(db: sqlite3.Connection, path: str) -> bool:
    """Store one --benchmark-json file, in one transaction; False when its run (GPU, commit, time)
    is already there. ResultsError for a file that load or by_name refuses (a benchmark twice, a
    median that is not a positive time); HistoryError when the database cannot be written."""
    data = load(path)
    benches = by_name(path, data)
    machine, commit = data["machine_info"], data.get("commit_info") or {}
    gpu = str(machine.get("gpu") or machine.get("device") or machine.get("node") or "unknown")
    key = (gpu, str(commit.get("id") or "unknown"), str(data.get("datetime") or commit.get("time") or "unknown"))
    rows = [(name, b.get("group"), number(b["stats"]["median"]), number(b["stats"].get("iqr")), b["stats"].get("rounds"), json.dumps(b["extra_info"]))
            for name, b in benches.items()]
    try:
        with write_transaction(db):
            if db.execute("SELECT 1 FROM runs WHERE gpu = ? AND commit_id = ? AND time = ?", key).fetchone():
                return False
            run = db.execute(
                "INSERT INTO runs (gpu, commit_id, time, source, machine_info, commit_info) VALUES (?, ?, ?, ?, ?, ?)",
                (*key, str(path), json.dumps(machine), json.dumps(commit)),
            ).lastrowid
            db.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", [(run, *row) for row in rows])
    except sqlite3.DatabaseError as exc:
        database = db.execute("PRAGMA database_list").fetchone()[2]
        raise HistoryError(f"{database}: cannot write {path} into the history: {exc}") from exc
    return True


def keyword_filter(expr: str | None):
    """pytest's -k: words match substrings of a benchmark's name, joined by and / or / not and
    parentheses. None matches everything."""
    if not expr:
        return lambda name: True
    tokens = re.findall(r"\(|\)|[^\s()]+", expr)
    code = []
    for tok in tokens:
        code.append(tok if tok in ("and", "or", "not", "(", ")") else f"({tok!r} in name)")
    source = " ".join(code)
    try:
        compiled = compile(source, "-k", "eval")
    except SyntaxError as exc:
        raise argparse.ArgumentTypeError(f"-k {expr!r} is not an expression of words, and, or, not and parentheses") from exc
    return lambda name: eval(compiled, {"__builtins__": {}}, {"name": name})  # noqa: S307 - built from quoted words only


def gpus(db: sqlite3.Connection, only: str | None) -> list[str]:
    names = [row[0] for row in db.execute("SELECT DISTINCT gpu FROM runs ORDER BY gpu")]
    return [g for g in names if only is None or g == only]


def recent_runs(db: sqlite3.Connection, gpu: str, last: int) -> list[tuple]:
    """(id, commit, time, machine_info) of the GPU's newest `last` runs, oldest first."""
    rows = db.execute("SELECT id, commit_id, time, machine_info FROM runs WHERE gpu = ? ORDER BY time DESC, id DESC LIMIT ?", (gpu, last))
    return list(reversed(rows.fetchall()))


def run_note(machine_info: str) -> str:
    """' (PARTIAL: reason)' for a stored run that was cut short, else ''."""
    try:
        partial = partial_info({"machine_info": json.loads(machine_info)})
    except (TypeError, ValueError, AttributeError):
        return ""
    return f" (PARTIAL: {partial.get('reason', 'cut short')})" if partial else ""


def series(db: sqlite3.Connection, runs: list[tuple], wanted) -> dict[str, list]:
    """{benchmark: [(median, group, extra_info) or None per run]} for the benchmarks `wanted` names."""
    out: dict[str, list] = {}
    for i, (run_id, *_rest) in enumerate(runs):
        for name, grp, median, extra in db.execute("SELECT name, grp, median, extra_info FROM results WHERE run_id = ?", (run_id,)):
            if wanted(name):
                out.setdefault(name, [None] * len(runs))[i] = (median, grp, json.loads(extra))
    return out


def show(db: sqlite3.Connection, args) -> int:
    shown = 0
    for gpu in gpus(db, args.gpu):
        runs = recent_runs(db, gpu, args.last)
        trends = series(db, runs, keyword_filter(args.k))
        if not trends:
            continue
        print(f"## {gpu}: last {len(runs)} run(s), median times, oldest first\n")
        print("runs: " + "; ".join(f"{i + 1} = {commit[:10]} {time}{run_note(machine)}" for i, (_, commit, time, machine) in enumerate(runs)) + "\n")
        body = []
        for name in sorted(trends):
            points = trends[name]
            medians = [p[0] if p else None for p in points]
            known = [m for m in medians if m is not None]
            change = f"{100 * (known[-1] / known[0] - 1):+.1f}%" if len(known) > 1 and known[0] else DASH
            body.append([name, *(fmt_duration(m) for m in medians), change])
        print(pipe_table(["benchmark", *(str(i + 1) for i in range(len(runs))), "last vs first"], body, right=set(range(1, len(runs) + 2))) + "\n")
        shown += len(trends)
        if args.plot:
            for path in plot(gpu, runs, trends, args.plot):
                print(f"wrote {path}")
    if not shown:
        print("error: no benchmark in the history matches", file=sys.stderr)
        return 2
    return 0


def plot(gpu: str, runs: list[tuple], trends: dict[str, list], outdir: Path) -> list[Path]:
    """One PNG per benchmark group: each benchmark's throughput (its suite's field; the median time
    where it has none) across the runs, and the runs' measured ceiling dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    outdir.mkdir(parents=True, exist_ok=True)  # output_dir checked it can be, when the command line was parsed
    groups: dict[str, list[str]] = {}
    for name, points in trends.items():
        grp = next((p[1] for p in points if p and p[1]), None) or "ungrouped"
        groups.setdefault(grp, []).append(name)
    written = []
    for grp, names in sorted(groups.items()):
        fig = Figure(figsize=(8, 4.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ceiling_key, unit = None, "median s"
        for name in sorted(names):
            extras = [p[2] if p else {} for p in trends[name]]
            suite = SUITES.get(next((e.get("suite") for e in extras if e.get("suite")), ""))
            if suite:
                ys = [number(e.get(suite.throughput)) for e in extras]
                ceiling_key, unit = next((e.get("ceiling") for e in extras if e.get("ceiling")), suite.ceiling), suite.unit
            else:
                ys = [p[0] if p else None for p in trends[name]]
            xs = [i + 1 for i, y in enumerate(ys) if y is not None]
            ax.plot(xs, [y for y in ys if y is not None], marker="o", label=name.rsplit("::", 1)[-1])
        if ceiling_key:
            ceilings = [number(json.loads(machine).get(ceiling_key)) for *_, machine in runs]
            ax.plot(range(1, len(runs) + 1), ceilings, linestyle="--", color="grey", label=f"ceiling ({ceiling_key})")
        ax.set(xlabel="run (oldest first)", ylabel=unit, title=f"{grp} on {gpu}")
        ax.set_xticks(range(1, len(runs) + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        path = outdir / (re.sub(r"[^A-Za-z0-9.-]+", "-", f"{gpu} {grp}").strip("-") + ".png")
        save_figure(fig, path, dpi=100)
        written.append(path)
    return written


def band(history: list[float], floor: float) -> float:
    """The relative noise band for a benchmark with these earlier medians."""
    center = statistics.median(history)
    if len(history) < 3:
        return floor
    mad = statistics.median(abs(m - center) for m in history)
    return max(floor, SPREAD_FACTOR * mad / center)


@dataclass
class GpuCheck:
    """One GPU's newest run (commit, time) against the `earlier` runs before it: a table row per
    benchmark that has figures on both sides (benchmark, history median, newest, change, band,
    verdict). No earlier run: nothing compared."""

    gpu: str
    newest: tuple[str, str]
    earlier: int
    rows: list[list[str]]


@dataclass
class Check:
    """Each GPU's newest run against its history; `failures` names every benchmark slower than its
    band, `refusals` why the check cannot judge (a median that is not a time, nothing compared)."""

    gpus: list[GpuCheck]
    failures: list[str]
    compared: int
    refusals: list[str] = field(default_factory=list)

    @property
    def code(self) -> int:
        return 2 if self.refusals else 1 if self.failures else 0


def check_history(db: sqlite3.Connection, threshold: int = THRESHOLD, gpu: str | None = None, last: int = LAST) -> Check:
    """The newest run of each GPU (only `gpu` when given) against its `last` runs before it, with
    a band no narrower than `threshold` percent."""
    if last < 1:
        raise ValueError(f"last: expected a whole number of runs >= 1, got {last}")
    result = Check([], [], 0)
    names = gpus(db, gpu)
    if not names:
        present = gpus(db, None)
        result.refusals.append(f"--gpu {gpu!r}: no run of that GPU in the history; it holds {', '.join(present)}" if present else "the history holds no run")
    for name in names:
        runs = recent_runs(db, name, last + 1)
        verdicts = GpuCheck(name, (runs[-1][1], runs[-1][2]), len(runs) - 1, [])
        result.gpus.append(verdicts)
        if not verdicts.earlier:
            continue
        refused = len(result.refusals)
        for bench, points in sorted(series(db, runs, keyword_filter(None)).items()):
            medians = [p[0] if p else None for p in points]
            bad = [(run, m) for run, m in zip(runs, medians, strict=True) if m is not None and m <= 0]
            if bad:  # stored before add refused such figures, or by another tool
                (_, commit, when, _), m = bad[0]
                result.refusals.append(f"{name}: {bench}: the median of run {commit[:10]} {when} is {m:g} s, not a time; nothing is compared against it")
                continue
            newest, history = medians[-1], [m for m in medians[:-1] if m is not None]
            if newest is None or not history:
                continue
            center, width = statistics.median(history), band(history, threshold / 100)
            ratio = newest / center
            verdict = "SLOWER" if ratio > 1 + width else "ok"
            result.compared += 1
            verdicts.rows.append([bench, fmt_duration(center), fmt_duration(newest), f"{100 * (ratio - 1):+.1f}%", f"±{100 * width:.1f}%", verdict])
            if verdict != "ok":
                result.failures.append(f"{name}: {bench}: {100 * (ratio - 1):+.1f}% against a band of {100 * width:.1f}%")
        if not verdicts.rows and len(result.refusals) == refused:
            commit, when = verdicts.newest
            result.refusals.append(f"{name}: nothing compared: no benchmark of the newest run ({commit[:10]} {when}) has a median both there and in the {verdicts.earlier} earlier run(s)")
    return result


def render_check(result: Check) -> str:
    """The check as `history check` prints it: a table per GPU, then the verdict."""
    lines = []
    for g in result.gpus:
        if not g.earlier:
            lines.append(f"{g.gpu}: one run, nothing to compare it with")
            continue
        lines.append(f"## {g.gpu}: run {g.newest[0][:10]} {g.newest[1]} against the {g.earlier} before it\n")
        if not g.rows:
            lines.append("no benchmark of the newest run has a figure in the runs before it\n")
            continue
        lines.append(pipe_table(["benchmark", "history median", "newest", "change", "band", "verdict"], g.rows, right={1, 2, 3, 4}) + "\n")
    if result.failures:
        lines.append(f"FAIL: {len(result.failures)} benchmark(s) slower than their history's band:\n" + "\n".join(f"  {f}" for f in result.failures))
    if result.refusals:
        lines.append(f"CANNOT JUDGE ({len(result.refusals)}; exit 2):\n" + "\n".join(f"  {r}" for r in result.refusals))
    if not result.failures and not result.refusals:
        lines.append(f"OK: no benchmark slower than its history's band ({result.compared} compared)")
    return "\n".join(lines)


def runs_count(text: str) -> int:
    """Parse --last: a whole number of runs, at least 1 (0 would compare with nothing, and SQLite
    reads a negative LIMIT as none)."""
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of runs >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("add", help="store runs")
    p.add_argument("db", help="database file or sqlite:/// URL (created if missing)")
    p.add_argument("files", nargs="+", help="pytest-benchmark JSON (--benchmark-json)")
    p = sub.add_parser("show", help="each benchmark's trend over one GPU's last runs")
    p.add_argument("db")
    p.add_argument("-k", metavar="EXPR", help="benchmarks whose names match, as pytest's -k")
    p.add_argument("--gpu", help="only this GPU (as machine_info names it)")
    p.add_argument("--last", type=runs_count, default=LAST, help=f"runs per GPU (default {LAST})")
    p.add_argument("--plot", type=output_dir, metavar="DIR", help="also write a PNG per benchmark group")
    p = sub.add_parser("check", help="the newest run of each GPU against its history")
    p.add_argument("db")
    p.add_argument("--threshold", type=threshold, default=THRESHOLD, help=f"the band's floor, a whole percentage (default {THRESHOLD}%%)")
    p.add_argument("--gpu", help="only this GPU")
    p.add_argument("--last", type=runs_count, default=LAST, help=f"earlier runs the newest is compared with (default {LAST})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "show":
        try:
            keyword_filter(args.k)  # a malformed -k is a usage error, before anything is read
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    try:
        db = open_db(args.db, create=args.command == "add")
        if args.command == "add":
            for path in args.files:
                print(f"{path}: {'added' if add(db, path) else 'already in the history, skipped'}")
                partial = partial_info(load(path))
                if partial:
                    print(f"{path}: {partial_line(partial)}")
            return 0
        if args.command == "show":
            return show(db, args)
        result = check_history(db, args.threshold, args.gpu, args.last)
        print(render_check(result))
        for refusal in result.refusals:
            print(f"error: {refusal}", file=sys.stderr)
        return result.code
    except (HistoryError, ResultsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
