"""Where an engine step's time goes: host scheduling and input building against the model run.

LLM.generate records one StepRecord per step into `LLM.step_records`. The clock is the host's:
`launch_s` is the Python that queues the step's kernels, and `wait_s` the time the host then
waits for the step's sampled tokens, which holds the device time the host's work did not cover.
The rest (`schedule_s`, `prepare_s`, `postprocess_s`) is Python. Synchronously the device idles
through all of a step's host time; under async scheduling the next step's scheduling, input
building and launch overlap this step's device work, and only what is left shows as waiting.
The steps' total_s add up to the loop's wall time either way.
"""

import statistics
from dataclasses import dataclass

STEP_ANNOTATION = "minivllm step"  # how the profiler range of a step's launch begins


@dataclass
class StepRecord:
    prefill: bool  # the step computes prefill chunks (decode rows may ride along)
    batch: int  # sequences in the step
    new_tokens: int  # tokens the step computes
    context_tokens: int  # tokens of K/V the step's attention reads, its new tokens included
    # (query, key) pairs the step's causal attention scores: a chunk of n new tokens after s
    # computed ones scores n·s + n(n + 1)/2 (a decode row: its context). The prefill rows' floor.
    attention_pairs: int
    schedule_s: float = 0.0
    prepare_s: float = 0.0  # packing positions, slots, block tables and copying them to the device
    launch_s: float = 0.0
    wait_s: float = 0.0
    postprocess_s: float = 0.0
    # Triton kernels compiled during the launch (kernels/compiles.py): its time then holds JIT
    # work, which a warmed-up engine should never meet.
    compiles: int = 0

    @property
    def host_s(self) -> float:
        return self.schedule_s + self.prepare_s + self.launch_s + self.postprocess_s

    @property
    def total_s(self) -> float:
        return self.host_s + self.wait_s


def batch_bucket(batch: int) -> int:
    """The power of two at or above `batch`: decode steps are summarised per bucket."""
    return 1 << max(0, batch - 1).bit_length()


def summarize(records: list[StepRecord]) -> list[dict]:
    """One row per (phase, batch bucket): step count, total seconds, the median milliseconds of
    each part of a step, and the work its steps did, summed: `rows` (sequences, a step's batch),
    `new_tokens`, `context_tokens` and `attention_pairs` (benchmarks/extra_info.py turns them into
    the row's floor), and `compiles`, the Triton kernels its steps compiled. Prefill steps form one row (bucket 0)."""
    groups: dict[tuple[str, int], list[StepRecord]] = {}
    for r in records:
        key = ("prefill", 0) if r.prefill else ("decode", batch_bucket(r.batch))
        groups.setdefault(key, []).append(r)
    rows = []
    for (phase, bucket), rs in sorted(groups.items()):
        row = dict(phase=phase, batch_up_to=bucket or max(r.batch for r in rs), steps=len(rs), total_s=sum(r.total_s for r in rs))
        row.update(rows=sum(r.batch for r in rs), **{f: sum(getattr(r, f) for r in rs) for f in ("new_tokens", "context_tokens", "attention_pairs", "compiles")})
        for part in ("schedule_s", "prepare_s", "launch_s", "wait_s", "postprocess_s", "host_s", "total_s"):
            row[f"median_{part[:-2]}_ms"] = 1e3 * statistics.median(getattr(r, part) for r in rs)
        row["host_share"] = sum(r.host_s for r in rs) / row["total_s"] if row["total_s"] else 0.0
        rows.append(row)
    return rows


def format_summary(records: list[StepRecord]) -> str:
    """summarize() as an aligned text table."""
    header = (
        f"{'phase':8} {'batch<=':>7} {'steps':>6} {'total s':>8} {'sched ms':>9} {'prep ms':>8} {'launch ms':>10} {'wait ms':>8} "
        f"{'post ms':>8} {'host %':>7}"
    )
    lines = [header]
    for row in summarize(records):
        lines.append(
            f"{row['phase']:8} {row['batch_up_to']:>7} {row['steps']:>6} {row['total_s']:>8.3f} {row['median_schedule_ms']:>9.3f} "
            f"{row['median_prepare_ms']:>8.3f} {row['median_launch_ms']:>10.3f} {row['median_wait_ms']:>8.3f} "
            f"{row['median_postprocess_ms']:>8.3f} {100 * row['host_share']:>6.1f}%"
        )
    return "\n".join(lines)


def step_annotation(index: int, record: StepRecord) -> str:
    """The name of the profiler range a step's launch runs in (LLM._run):
    'minivllm step <index> <prefill|decode> x<batch>'."""
    return f"{STEP_ANNOTATION} {index} {'prefill' if record.prefill else 'decode'} x{record.batch}"


def annotated_kind(name: str) -> str | None:
    """'prefill' or 'decode' for a step_annotation name; None for any other range."""
    words = name.split()
    return words[3] if name.startswith(STEP_ANNOTATION + " ") and len(words) == 5 else None
