"""Per-device tuning tables: the lookup order, nearest buckets, the tuner that writes them, and
the committed tables' validity."""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import tune
from minivllm.engine.linear import skinny_tile
from minivllm.kernels import cascade_attention_decode, flash_attn_varlen, paged_attention_decode
from minivllm.kernels.cascade_attention import CascadeConfig, cascade_config
from minivllm.kernels.flash_attention import prefill_config
from minivllm.kernels.paged_attention import DecodeConfig, decode_config
from minivllm.kernels.skinny_linear import FORMS, MAX_ROWS
from minivllm.kernels.tuning_table import DEFAULT_DIR, ENV_DIR, bucket, clear_cache, lookup, read_table, tables_for, write_table
from minivllm.reference import attention_ref, paged_decode_gather
from minivllm.reference.inputs import cu_seqlens, generator, paged_cache, randn, share_prefix
from minivllm.reference.tolerance import assert_matches_reference
from tests.full_disk import write_on_full_disk


@pytest.fixture
def table_dir(tmp_path, monkeypatch) -> Path:
    """An empty table directory that the kernels read instead of minivllm/kernels/configs."""
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    clear_cache()
    yield tmp_path
    clear_cache()


def _table(path: Path, capability, entries) -> None:
    prov = dict(gpu=path.stem, compute_capability=capability)
    path.write_text(json.dumps(dict(provenance=prov, runs=[prov], entries=entries)))


def _decode_entry(page, bucket_, block_n, dtype="bfloat16", head_dim=128):
    config = dict(fetch="gather", block_n=block_n, num_warps=4, num_stages=3, programs_per_sm=2)
    return dict(kernel="decode", dtype=dtype, head_dim=head_dim, page=page, bucket=list(bucket_), config=config, run=0)


def test_lookup_order_own_table_then_family_by_name_then_by_capability(table_dir):
    _table(table_dir / "nvidia-h100-80gb-hbm3.json", [9, 0], [_decode_entry(16, (128, 8192, 4), 64)])
    _table(table_dir / "nvidia-a100-sxm4-80gb.json", [8, 0], [_decode_entry(16, (128, 8192, 4), 32)])
    assert tables_for("nvidia-h100-80gb-hbm3", (9, 0), table_dir)[0] == "table"
    source, index = tables_for("nvidia-h100-nvl", (9, 0), table_dir)  # same name stem
    assert source == "family" and index[("decode", "bfloat16", 128, 16)][(128, 8192, 4)]["block_n"] == 64
    source, index = tables_for("nvidia-a100-pcie-40gb", (9, 0), table_dir)  # the stem wins over capability
    assert source == "family" and index[("decode", "bfloat16", 128, 16)][(128, 8192, 4)]["block_n"] == 32
    assert tables_for("nvidia-h800", (9, 0), table_dir)[0] == "family"  # same compute capability
    assert tables_for("nvidia-gb200", (10, 0), table_dir) == ("heuristic", {})


def test_nearest_bucket_and_missing_keys(table_dir):
    _table(table_dir / "cpu.json", None, [_decode_entry(16, (8, 2048, 4), 16), _decode_entry(16, (512, 32768, 4), 32), _decode_entry(16, (8, 2048, 16), 64)])
    cpu = torch.device("cpu")
    assert lookup("decode", cpu, torch.bfloat16, 128, 16, (16, 4096, 4))[0]["block_n"] == 16
    assert lookup("decode", cpu, torch.bfloat16, 128, 16, (1024, 16384, 4)) == (_decode_entry(16, (512, 32768, 4), 32)["config"], "table")
    # The GQA group is an axis like the others: a group of 16 takes its own entry, a group of 2 the nearer group's.
    assert lookup("decode", cpu, torch.bfloat16, 128, 16, (16, 4096, 16)) == (_decode_entry(16, (8, 2048, 16), 64)["config"], "table")
    # ...and says so: its source names the untuned group, as a report's [G] mark shows.
    assert lookup("decode", cpu, torch.bfloat16, 128, 16, (16, 4096, 2)) == (_decode_entry(16, (8, 2048, 4), 16)["config"], "other group")
    assert lookup("decode", cpu, torch.bfloat16, 128, 256, (16, 4096, 4)) == (None, "heuristic")  # other page
    assert lookup("decode", cpu, torch.float16, 128, 16, (16, 4096, 4)) == (None, "heuristic")  # other dtype
    assert [bucket(n) for n in (0, 1, 3, 4, 5, 1 << 20)] == [1, 1, 4, 4, 8, 1 << 15]


def test_malformed_table_names_the_file(table_dir):
    (table_dir / "cpu.json").write_text('{"entries": [{"kernel": "decode"}]}')
    with pytest.raises(ValueError, match="cpu.json"):
        lookup("decode", torch.device("cpu"), torch.bfloat16, 16, 16, (4, 64, 2))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda t: t.pop("runs"), "no 'runs' list"),
        (lambda t: t.update(runs=[]), "'runs' is empty"),
        (lambda t: t.update(runs=["x"]), "run 0 is not an object"),
        (lambda t: t.pop("provenance"), "no 'provenance' object"),
        (lambda t: t.update(entries={}), "no 'entries' list"),
        (lambda t: t["entries"][1].pop("run"), "entry 1 has no 'run' \\(an integer\\)"),
        (lambda t: t["entries"][1].update(run=3), "entry 1's 'run' 3 is not an index into 'runs' \\(1 run\\)"),
        (lambda t: t["entries"][0].update(head_dim="128"), "entry 0 has no 'head_dim' \\(an integer\\)"),
        (lambda t: t["entries"][0].pop("config"), "entry 0 has no 'config' \\(an object\\)"),
        (lambda t: t["entries"].append(7), "entry 2 is not an object"),
        (lambda t: t["entries"][0].update(bucket=[8]), "entry 0's bucket \\[8\\] is not \\(rows, context, group\\) for decode"),
        (lambda t: t["entries"][0].update(kernel="linear", bucket=[1, 8]), "entry 0's bucket \\[1, 8\\] is not \\(rows, N, K\\) for linear"),
    ],
)
def test_read_table_names_the_file_and_the_key_it_lacks(tmp_path, breakage, message):
    """Every key the lookups, write_table and merge_tables read is checked here, so none of them
    meets a raw KeyError later."""
    path = tmp_path / "nvidia-h100.json"
    _table(path, [9, 0], [_decode_entry(16, (8, 2048, 4), 16), _decode_entry(16, (64, 4096, 4), 32)])
    table = json.loads(path.read_text())
    breakage(table)
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=f"tuning table {path} is malformed: {message}"):
        read_table(path)


def test_two_axis_attention_buckets_read_as_the_8b_group(table_dir):
    """A table written before the GQA group was keyed (every attention entry tuned at Qwen3-8B's
    32 / 8 heads) serves lookups as group 4, and the next write stores it in three axes."""
    cpu = torch.device("cpu")
    prefill = dict(kernel="prefill", dtype="bfloat16", head_dim=128, page=0, bucket=[1024, True], config={"tile": [64, 64, 4, 2], "tma": False}, run=0)
    _table(table_dir / "cpu.json", None, [_decode_entry(16, (8, 2048), 16), prefill])
    assert read_table(table_dir / "cpu.json")["entries"][0]["bucket"] == [8, 2048, 4]
    assert lookup("decode", cpu, torch.bfloat16, 128, 16, (8, 2048, 4)) == (_decode_entry(16, (8, 2048), 16)["config"], "table")
    assert lookup("prefill", cpu, torch.bfloat16, 128, 0, (1024, True, 2))[0] == prefill["config"]
    write_table(table_dir / "cpu.json", {"gpu": "cpu"}, [_decode_entry(16, (8, 2048, 4), 32)])
    stored = json.loads((table_dir / "cpu.json").read_text())["entries"]
    assert sorted(e["bucket"] for e in stored) == [[8, 2048, 4], [1024, True, 4]] and len(stored) == 2
    assert next(e for e in stored if e["kernel"] == "decode")["config"]["block_n"] == 32  # replaced, not kept beside


def test_tuner_keys_attention_by_each_presets_group():
    """--preset: decode, prefill and cascade buckets at each model's heads, keyed by its GQA group,
    decode's rows counted in its kv heads; models of the same heads give their buckets once."""
    def keys(*presets):
        return {(b.kernel, b.page, b.key) for b in tune.buckets(True, ["bf16"], presets) if b.kernel in ("decode", "prefill", "cascade")}
    default = keys(*tune.ATTENTION_MODELS)
    assert {k[2][-1] for k in default} == {4} and ("decode", 16, (8, 512, 4)) in default
    both = keys("qwen3-0.6b", "qwen3-1.7b", "qwen3-235b-a22b")
    assert {k[2][-1] for k in both} == {2, 16} and len(both) == 2 * len(default)
    assert ("decode", 16, (8, 512, 2)) in both and ("decode", 16, (4, 512, 16)) in both and ("cascade", 256, (1024, 2048, 16)) in both
    assert ("prefill", 0, (512, True, 16)) in both


def test_a_table_write_that_fails_half_way_keeps_the_old_table(tmp_path):
    """The tuner killed, or its disk full, mid-write: the table it had is still whole."""
    path = tmp_path / "cpu.json"
    old = write_table(path, {"gpu": "cpu"}, [_decode_entry(16, (8, 2048, 4), 16)])
    winners = [_decode_entry(16, (8, 1 << i, 4), 16) for i in range(200)]
    setup = f"from pathlib import Path\nfrom minivllm.kernels.tuning_table import write_table\nwinners = {winners!r}"
    proc = write_on_full_disk(setup, f"write_table(Path({str(path)!r}), {{'gpu': 'cpu'}}, winners)", 8192)
    assert "File too large" in proc.stderr
    assert read_table(path) == old and [p.name for p in tmp_path.iterdir()] == ["cpu.json"]


def test_tuner_writes_a_table_the_kernels_then_use(table_dir, device):
    """The tuner's CPU run (interpreter, tiny candidates) or a GPU's: it writes this device's
    table, a second run of one bucket replaces that entry and keeps the rest, and the wrappers
    then launch with the table's choice and compute the right answer."""
    if device.type == "cuda":
        pytest.skip("the tuner's GPU run takes minutes; tests exercise its CPU run")
    assert tune.main(["--budget-s", "600"]) == 0
    path = table_dir / "cpu.json"
    first = read_table(path)
    assert {e["kernel"] for e in first["entries"]} == {"decode", "prefill", "cascade", *FORMS}
    assert first["provenance"]["torch"] == torch.__version__ and first["provenance"]["commit"]
    assert all(e["margin"] is not None and e["margin"] >= 0 for e in first["entries"])

    assert tune.main(["--kernel", "decode"]) == 0
    second = read_table(path)
    assert len(second["entries"]) == 3 + len(FORMS) and len(second["runs"]) == 2
    runs = {e["kernel"]: e["run"] for e in second["entries"]}
    assert runs == {"decode": 1, "prefill": 0, "cascade": 0} | dict.fromkeys(FORMS, 0)

    entry = next(e for e in second["entries"] if e["kernel"] == "decode")
    gen = generator(3, device)
    lens = [40, 17]
    cache = paged_cache(lens, 16, 2, 16, torch.bfloat16, device, gen)
    q = randn((2, 4, 16), torch.bfloat16, device, gen)
    config = decode_config(q, cache.k_cache, cache.v_cache, 40)
    assert config == DecodeConfig(source="table", **entry["config"])
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    out = paged_attention_decode(*args, max_context_len=40)
    assert_matches_reference(out, paged_decode_gather, *args)

    qp, kp, vp = (randn((40, h, 16), torch.bfloat16, device, gen) for h in (4, 2, 2))
    assert prefill_config(qp, kp, 40, True, False) == (next(e for e in second["entries"] if e["kernel"] == "prefill")["config"], "table")
    cu = cu_seqlens([40], device)
    out = flash_attn_varlen(qp, kp, vp, cu, cu, 40, 40)
    assert_matches_reference(out, attention_ref, qp, kp, vp, cu, cu)

    # The projections' entries: the engine takes each form's tile, or the unfused steps where they won.
    for form in FORMS:
        tile = next(e for e in second["entries"] if e["kernel"] == form)["config"].get("tile")
        assert skinny_tile(form, 2, torch.empty(40, 48, dtype=torch.bfloat16, device=device)) == (None if tile is None else tuple(tile))

    # The cascade entry: its tile, and its verdict against plain decode, which the wall clock of
    # the interpreter decides either way (min_rows 1, or never).
    entry = next(e for e in second["entries"] if e["kernel"] == "cascade")
    assert entry["config"]["min_rows"] == entry["config"]["min_shared"] in (1, tune.NEVER)
    assert cascade_config(device, torch.bfloat16, 16, 16, 3, 4, 2, 32) == CascadeConfig(source="table", **entry["config"])
    shared = share_prefix(paged_cache([40, 37, 33], 16, 2, 16, torch.bfloat16, device, gen), [40, 37, 33], 2)
    args = (randn((3, 4, 16), torch.bfloat16, device, gen), shared.k_cache, shared.v_cache, shared.block_table, torch.tensor([40, 37, 33], dtype=torch.int32, device=device))
    out = cascade_attention_decode(*args, torch.tensor([32], dtype=torch.int32, device=device), max_context_len=40)
    assert_matches_reference(out, paged_decode_gather, *args)


@pytest.mark.parametrize("path", sorted(DEFAULT_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_committed_tables_hold_valid_configs(path):
    """Every committed table parses, says where it came from, and holds configs the kernels
    accept: decode's fetch scheme and power-of-two tiles, prefill's tiles, the cascade's tiles and
    verdict, the projections' tiles or cuBLAS."""
    text = json.loads(path.read_text())
    assert all(len(e["bucket"]) == 3 for e in text["entries"]), "stored keyed as the lookups ask: attention buckets end with the GQA group"
    table = read_table(path)
    prov = table["provenance"]
    assert prov["gpu"] and prov["torch"] and prov["triton"] and prov["date"] and prov["commit"] and prov["compute_capability"]
    for e in table["entries"]:
        c = e["config"]
        if e["kernel"] == "decode":
            config = DecodeConfig(**c)
            assert config.fetch in ("tma", "gather") and config.programs_per_sm >= 1
            assert config.block_n & (config.block_n - 1) == 0 and (config.fetch == "gather" or e["page"] % config.block_n == 0)
        elif e["kernel"] == "cascade":
            config = CascadeConfig(**c)
            assert all(n & (n - 1) == 0 for n in (config.block_m, config.block_n)) and config.min_rows == config.min_shared in (1, tune.NEVER)
        elif e["kernel"] in FORMS:  # cuBLAS after the unfused step, or a tile the engine can launch at its rows
            rows, n, k = e["bucket"]
            assert 1 <= rows <= MAX_ROWS and n > 0 and k > 0 and (c == {"cublas": True} or set(c) == {"tile"})
            if "tile" in c:
                block_n, block_k, num_warps, num_stages = c["tile"]
                assert block_n & (block_n - 1) == 0 and block_k & (block_k - 1) == 0 and num_warps in (1, 2, 4, 8) and num_stages >= 1
                assert rows == 1 or block_n >= 16
        else:
            assert e["kernel"] == "prefill" and isinstance(c["tma"], bool)
            block_m, block_n, num_warps, num_stages = c["tile"]
            assert block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0 and num_warps in (4, 8) and num_stages >= 1


def test_tuner_times_the_prefill_winner_without_its_softmax(table_dir, tmp_path, device, monkeypatch):
    """--matmuls-alone measures the winner with one stage left out, and never makes that wrong
    answer a table entry. The rows and the table are written atomically."""
    if device.type == "cuda":
        pytest.skip("the tuner's GPU run takes minutes; tests exercise its CPU run")
    rows_file = tmp_path / "rows.json"
    replaced, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (real(src, dst), replaced.append(Path(dst))))
    assert tune.main(["--kernel", "prefill", "--matmuls-alone", "--json", str(rows_file)]) == 0
    assert sorted(replaced) == [table_dir / "cpu.json", rows_file]
    rows = json.loads(rows_file.read_text())["rows"]
    assert rows and all(r["matmuls_alone_ms"] > 0 for r in rows)
    (entry,) = read_table(table_dir / "cpu.json")["entries"]
    assert entry["config"]["tile"] in [r["config"]["tile"] for r in rows]


def test_tuner_part_takes_every_nth_bucket(table_dir, capsys, device):
    """--part I/N (a tuning array's task I of N) parses and refuses what is not a part; a part
    past the selection's end tunes nothing and says so."""
    assert tune.part("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError, match="invalid part"):
            tune.part(bad)
    chosen = len(tune.buckets(device.type == "cuda", ["bf16"]))
    assert tune.main(["--dtype", "bf16", "--part", f"{chosen}/{chosen + 1}"]) == 0
    assert "no bucket left for this part" in capsys.readouterr().out and not list(table_dir.glob("*.json"))


def test_tuner_missing_tunes_only_what_the_table_lacks(table_dir, capsys, device):
    """--missing: after a decode-only run, a run over decode and prefill times the prefill bucket
    alone and keeps the decode entry's run; once the table holds both, it times nothing."""
    if device.type == "cuda":
        pytest.skip("the tuner's GPU run takes minutes; tests exercise its CPU run")
    assert tune.main(["--kernel", "decode"]) == 0
    capsys.readouterr()
    assert tune.main(["--kernel", "decode", "--kernel", "prefill", "--missing"]) == 0
    assert "1 buckets ->" in capsys.readouterr().out
    table = read_table(table_dir / "cpu.json")
    assert {e["kernel"]: e["run"] for e in table["entries"]} == {"decode": 0, "prefill": 1}
    assert tune.main(["--kernel", "decode", "--kernel", "prefill", "--missing"]) == 0
    assert "nothing to tune" in capsys.readouterr().out
    assert len(read_table(table_dir / "cpu.json")["runs"]) == 2
    with pytest.raises(SystemExit):
        tune.main(["--missing", "--dry-run", "--target", "sm_90"])


def test_decode_winner_is_the_fastest_on_the_ragged_batch_within_the_slack():
    """A decode bucket's entry: among the candidates within RAGGED_SLACK of the fastest on the
    uniform batch, the fastest on the ragged one; its margin is on the ragged batch. A candidate
    further off on the uniform batch never wins, however fast on the ragged one. Rows without a
    ragged batch keep their order."""
    slack = tune.RAGGED_SLACK
    rows = [dict(name="a", ms=1.0, ragged_ms=1.0), dict(name="b", ms=1.0 + slack / 2, ragged_ms=0.8), dict(name="c", ms=1.0 + 2 * slack, ragged_ms=0.5)]
    ranked, key = tune.table_ranking(rows)
    assert [r["name"] for r in ranked] == ["b", "a", "c"] and key == "ragged_ms"
    ranked, key = tune.table_ranking([rows[0], rows[2]])
    assert [r["name"] for r in ranked] == ["a", "c"] and key == "ms"
    plain = [dict(name="x", ms=1.0), dict(name="y", ms=1.5)]
    assert tune.table_ranking(plain) == (plain, "ms")


def test_ragged_lens_spread_down_to_a_quarter_longest_first():
    assert tune.ragged_lens(4, 40) == [40, 30, 20, 10]
    assert tune.ragged_lens(1, 40) == [40]
    lens = tune.ragged_lens(16, 32768)
    assert lens[0] == 32768 and lens[-1] == 8192 and lens == sorted(lens, reverse=True)


def test_tuner_times_decode_on_a_ragged_batch_and_checks_it(table_dir, tmp_path, device, monkeypatch):
    """The CPU run: each decode candidate carries its ragged batch's time, the entry records that
    batch; a candidate wrong on the ragged batch alone is reported and never becomes the entry."""
    if device.type == "cuda":
        pytest.skip("the tuner's GPU run takes minutes; tests exercise its CPU run")
    real = tune.check_decode

    def wrong_on_ragged(out, q, cache, lens, what):
        if what == "gather n16 w4 s1 pps2 on the ragged batch":
            raise tune.ToleranceError(f"{what}: made wrong by the test")
        return real(out, q, cache, lens, what)

    monkeypatch.setattr(tune, "check_decode", wrong_on_ragged)
    rows_file = tmp_path / "rows.json"
    assert tune.main(["--kernel", "decode", "--json", str(rows_file)]) == 0
    rows = {r["name"]: r for r in json.loads(rows_file.read_text())["rows"]}
    assert set(rows) == {"gather n16 w4 s1 pps2", "gather n32 w4 s1 pps4"}
    bad, good = rows["gather n16 w4 s1 pps2"], rows["gather n32 w4 s1 pps4"]
    assert bad["ms"] is None and "on the ragged batch" in bad["error"]
    assert good["ms"] > 0 and good["ragged_ms"] > 0
    (entry,) = read_table(table_dir / "cpu.json")["entries"]
    assert entry["config"] == good["config"] and entry["ragged_ms"] == good["ragged_ms"] and entry["ragged_lens"] == [40, 10]
