"""Per-device tuning tables: which tile, fetch scheme and split policy a kernel launches with.

A table is `minivllm/kernels/configs/<device slug>.json` (or in the directory named by
MINIVLLM_KERNEL_CONFIGS), written by `python -m benchmarks.tune`:

    {"provenance": {"gpu": ..., "compute_capability": [9, 0], "sm_count": ..., ...},
     "entries": [{"kernel": "decode", "dtype": "bfloat16", "head_dim": 128, "page": 16,
                  "bucket": [rows, context, group], "config": {...}, "margin": 0.04}, ...]}

The key is (kernel, dtype, head_dim, page, bucket). Buckets are powers of two: for decode
(batch x kv_heads, max context, GQA group), for prefill (max key length, causal, GQA group), for
the cascade (batch x kv_heads, shared prefix, GQA group); page is 0 for contiguous keys. The group
(query heads per kv head) is keyed because it sets how many query rows a decode program packs and
how a prefill's K/V tiles are shared: the 8B's 32 / 8 heads' winners lost on the 235B's 64 / 4
(benchmarks/NOTES.md). The engine's projections (kernels `linear`, `norm_linear`, `gated_linear`:
skinny_linear's forms; head_dim and page 0) are keyed (rows as a power of two, N, K) of their
weight; their config is a skinny_linear tile, or cuBLAS where the unfused steps won. A shape
whose bucket the table lacks takes the nearest tuned bucket of the same kernel, dtype, head_dim
and page. A device is looked up as itself, then as its family (a table of the
same name stem, as an H100 NVL falls back to the H100's, else of the same compute capability),
then the kernels' own heuristics; the answer says which (`table`, `family`, `heuristic`, or
`other group` where the device's own table served an attention shape from another GQA group's entry).
Lookups are cached, so a launch pays one dict access; under a CUDA graph it happens at capture.
write_table, save_table and merge_tables, which the tuner and slurm.tune_merge use, touch JSON only;
the writers replace a table atomically.
"""

import functools
import json
import math
import os
import re
from pathlib import Path

import torch

from minivllm.atomic_write import write_atomic
from minivllm.dtypes import dtype_name

DEFAULT_DIR = Path(__file__).parent / "configs"
ENV_DIR = "MINIVLLM_KERNEL_CONFIGS"
MAX_BUCKET = 1 << 15


def config_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def device_slug(device: torch.device) -> str:
    """'nvidia-h200', 'nvidia-h100-80gb-hbm3': the device's name in lower case, words joined by
    '-'; 'cpu' for the interpreter."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def bucket(n: int) -> int:
    """n rounded up to a power of two, in [1, MAX_BUCKET]."""
    return min(MAX_BUCKET, 1 << max(0, int(n) - 1).bit_length())


# Each kernel's bucket axes. The attention kernels' last axis is the GQA group; tables written
# before it was keyed hold two-axis attention buckets, all tuned at the one shape the tuner had
# then, Qwen3-8B's 32 / 8 heads, so read_table reads them as group UNGROUPED_AS.
BUCKET_AXES = {"decode": ("rows", "context", "group"), "prefill": ("key length", "causal", "group"), "cascade": ("rows", "shared prefix", "group"),
               **dict.fromkeys(("linear", "norm_linear", "gated_linear"), ("rows", "N", "K"))}
UNGROUPED_AS = 4


def _grouped(kernel: str) -> bool:
    """Whether the kernel's buckets end with the GQA group (the attention kernels)."""
    return BUCKET_AXES.get(kernel, ())[-1:] == ("group",)


def _ungrouped(entry: dict) -> bool:
    """Whether an entry is an attention entry written before the GQA group was keyed."""
    return _grouped(entry["kernel"]) and len(entry["bucket"]) == len(BUCKET_AXES[entry["kernel"]]) - 1


def entry_key(kernel: str, dtype: str, head_dim: int, page: int) -> tuple:
    return kernel, dtype, int(head_dim), int(page)


def entry_id(entry: dict) -> tuple:
    """An entry's full key, (kernel, dtype, head_dim, page, bucket as JSON): what a newer entry
    replaces an older one by, and the order a table's entries are written in."""
    return *entry_key(entry["kernel"], entry["dtype"], entry["head_dim"], entry["page"]), json.dumps(entry["bucket"])


# What every entry holds, with its JSON type: the lookups read the key and config, write_table and
# merge_tables the run (an index into the table's `runs`).
ENTRY_FIELDS = {"kernel": (str, "a string"), "dtype": (str, "a string"), "head_dim": (int, "an integer"), "page": (int, "an integer"),
                "bucket": (list, "a list"), "config": (dict, "an object"), "run": (int, "an integer")}


def table_problem(table) -> str | None:
    """What a parsed table lacks that the lookups, write_table or merge_tables would read, or None."""
    if not isinstance(table, dict):
        return "not a JSON object"
    for key, kind, what in (("provenance", dict, "object"), ("runs", list, "list"), ("entries", list, "list")):
        if not isinstance(table.get(key), kind):
            return f"no '{key}' {what}"
    if not table["runs"]:
        return "'runs' is empty: every table names the run(s) that wrote it"
    for i, run in enumerate(table["runs"]):
        if not isinstance(run, dict):
            return f"run {i} is not an object"
    for i, entry in enumerate(table["entries"]):
        if not isinstance(entry, dict):
            return f"entry {i} is not an object"
        for key, (kind, what) in ENTRY_FIELDS.items():
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                return f"entry {i} has no '{key}' ({what})"
        axes = BUCKET_AXES.get(entry["kernel"])
        if axes and len(entry["bucket"]) != len(axes) and not _ungrouped(entry):
            return f"entry {i}'s bucket {entry['bucket']} is not ({', '.join(axes)}) for {entry['kernel']}"
        if not 0 <= entry["run"] < len(table["runs"]):
            return f"entry {i}'s 'run' {entry['run']} is not an index into 'runs' ({len(table['runs'])} run{'s' * (len(table['runs']) > 1)})"
    return None


def read_table(path: Path) -> dict:
    """A table file, checked for every key the lookups, write_table and merge_tables read; ValueError
    names the file and what is wrong with it. Two-axis attention buckets come back with group
    UNGROUPED_AS, so a rewrite stores them keyed as the lookups ask."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"tuning table {path} is unreadable: {type(e).__name__}: {e}") from None
    problem = table_problem(table)
    if problem:
        raise ValueError(f"tuning table {path} is malformed: {problem}")
    for e in table["entries"]:
        if _ungrouped(e):
            e["bucket"] = [*e["bucket"], UNGROUPED_AS]
    return table


def save_table(path: Path, table: dict) -> None:
    """Write `table` to `path` atomically, so a tuner killed mid-write leaves the old table whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(table, indent=1) + "\n")


def write_table(path: Path, prov: dict, winners: list[dict]) -> dict:
    """Merge `winners` into the table at `path` (a new one if absent): an entry of the same key
    and bucket is replaced, the rest kept. Each entry names the run that measured it."""
    table = read_table(path) if path.is_file() else {"provenance": {}, "runs": [], "entries": []}
    table["runs"].append(prov)
    run = len(table["runs"]) - 1
    table["provenance"] = dict(prov, note="the latest run; `runs` lists every run, and each entry names its own")
    fresh = {entry_id(w) for w in winners}
    kept = [e for e in table["entries"] if entry_id(e) not in fresh]
    table["entries"] = sorted(kept + [dict(w, run=run) for w in winners], key=entry_id)
    save_table(path, table)
    return table


def merge_tables(tables: list[dict]) -> dict:
    """One table from several runs' tables of one GPU model (the tasks of a tuning array): every
    run kept, each entry still naming its own; a key tuned twice keeps the later run's winner.
    ValueError when the tables come from different GPU models, whose figures must not mix."""
    gpus = sorted({str(t["provenance"].get("gpu")) for t in tables})
    if len(gpus) != 1:
        raise ValueError(f"tables from different GPU models ({', '.join(gpus)}) cannot be merged into one")
    merged: dict = {"provenance": {}, "runs": [], "entries": []}
    by_key: dict[tuple, dict] = {}
    for table in tables:
        offset = len(merged["runs"])
        merged["runs"] += table["runs"]
        for e in table["entries"]:
            by_key[entry_id(e)] = dict(e, run=e["run"] + offset)
    merged["entries"] = [by_key[k] for k in sorted(by_key)]
    merged["provenance"] = dict(merged["runs"][-1], note=f"merged from {len(tables)} tables of one tuning array; `runs` lists every run")
    return merged


def _index(table: dict) -> dict[tuple, dict[tuple, dict]]:
    """{(kernel, dtype, head_dim, page): {bucket: config}}."""
    index: dict[tuple, dict[tuple, dict]] = {}
    for e in table["entries"]:
        index.setdefault(entry_key(e["kernel"], e["dtype"], e["head_dim"], e["page"]), {})[tuple(e["bucket"])] = e["config"]
    return index


def _family_stem(slug: str) -> str:
    """'nvidia-h100' of 'nvidia-h100-nvl': vendor and model, without memory or form factor."""
    return "-".join(slug.split("-")[:2])


@functools.cache
def tables_for(slug: str, capability: tuple[int, int] | None, directory: Path) -> tuple[str, dict]:
    """(source, index) for a device: its own table, else its family's, else no entries."""
    own = directory / f"{slug}.json"
    if own.is_file():
        return "table", _index(read_table(own))
    others = sorted(p for p in directory.glob("*.json") if p.is_file())
    stem = _family_stem(slug)
    for path in others:
        if path.stem.startswith(stem + "-") or path.stem == stem:
            return "family", _index(read_table(path))
    for path in others:
        table = read_table(path)
        if capability is not None and tuple(table["provenance"].get("compute_capability") or ()) == capability:
            return "family", _index(table)
    return "heuristic", {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


@functools.cache
def _nearest(buckets: tuple[tuple, ...], want: tuple) -> tuple:
    """The tuned bucket closest to `want` in log2 distance, summed over the bucket's axes (a
    mismatch of a non-numeric axis, such as causal, counts more than any distance)."""

    def distance(b: tuple) -> float:
        d = 0.0
        for have, need in zip(b, want, strict=True):
            if isinstance(need, bool) or isinstance(have, bool):
                d += 0 if bool(have) == bool(need) else 1e6
            else:
                d += abs(math.log2(max(have, 1)) - math.log2(max(need, 1)))
        return d

    return min(buckets, key=distance)


@functools.cache
def lookup(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, page: int, want: tuple) -> tuple[dict | None, str]:
    """(config, source) for one launch: the config the device's table (or its family's) holds
    for this key and the nearest tuned bucket to `want` (power-of-two buckets), or
    (None, 'heuristic'). The source is 'other group' where the device's own table served an
    attention launch from an entry tuned at another GQA group (a model whose heads were not
    tuned). Cached: callers pass bucketed shapes, so the cache stays small."""
    source, index = tables_for(device_slug(device), _capability(device), config_dir())
    entries = index.get(entry_key(kernel, dtype_name(dtype), head_dim, page))
    if not entries:
        return None, "heuristic"
    chosen = _nearest(tuple(entries), tuple(want))
    if source == "table" and _grouped(kernel) and chosen[-1] != want[-1]:
        source = "other group"
    return entries[chosen], source


def clear_cache() -> None:
    """Forget loaded tables: after the tuner rewrites one, or a test points ENV_DIR elsewhere."""
    tables_for.cache_clear()
    lookup.cache_clear()
