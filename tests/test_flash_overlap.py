"""flash_overlap's Gluon prefill kernel: against the float64 reference on a Hopper GPU, its
compiled schedule for sm_90 on any machine, and the fallback wherever it cannot run."""

import json
import re

import pytest
import torch

from benchmarks.tune import overlap_tiles
from minivllm.kernels.flash_attention import _flash_fwd, prefill_launches, run_launches
from minivllm.kernels.flash_overlap import _flash_fwd_overlap
from minivllm.reference import attention_ref
from minivllm.reference.inputs import cu_seqlens, generator, randn
from minivllm.reference.tolerance import assert_matches_reference
from tests.compiled import run_python

TILES = overlap_tiles(True)


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def inputs(q_lens, k_lens, heads, kv_heads, head_dim, dtype, device, seed=0):
    gen = generator(seed, device)
    q = randn((sum(q_lens), heads, head_dim), dtype, device, gen)
    k, v = (randn((sum(k_lens), kv_heads, head_dim), dtype, device, gen) for _ in "kv")
    return q, k, v, cu_seqlens(q_lens, device), cu_seqlens(k_lens, device)


def overlap_launches(q, k, v, out, cu_q, cu_k, max_q, max_k, causal, tile):
    return prefill_launches(q, k, v, out, cu_q, cu_k, max_q, max_k, q.shape[-1] ** -0.5, causal, None, tile=tile, overlap=True)


@pytest.mark.skipif(not hopper(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "q_lens, k_lens",
    [
        ((1, 77, 130, 513), (1, 77, 130, 513)),  # odd lengths across tile edges
        ((5, 64, 200), (300, 64, 1031)),  # fewer queries than keys: a cached prefix
        ((9, 140), (4, 70)),  # more queries than keys: under causal, rows that see no key
    ],
    ids=["self", "prefix", "short_keys"],
)
def test_overlap_matches_reference(tile, dtype, head_dim, causal, q_lens, k_lens, device):
    q, k, v, cu_q, cu_k = inputs(q_lens, k_lens, 12, 4, head_dim, dtype, device, seed=sum(q_lens))
    out = torch.full_like(q, float("nan"))
    launches = overlap_launches(q, k, v, out, cu_q, cu_k, max(q_lens), max(k_lens), causal, tile)
    assert launches[-1][0] is _flash_fwd_overlap
    run_launches(launches)
    assert_matches_reference(out, attention_ref, q, k, v, cu_q, cu_k, causal=causal, what=f"overlap {tile} {dtype} d{head_dim} causal={causal}")


@pytest.mark.skipif(not hopper(), reason="needs a Hopper GPU (sm_90)")
def test_overlap_understated_max_seqlen_q_still_writes_every_row(device):
    """A grid sized for 64 queries strides over a 300-query sequence's remaining tiles."""
    q, k, v, cu_q, cu_k = inputs((300, 7), (300, 7), 4, 2, 128, torch.bfloat16, device)
    out = torch.full_like(q, float("nan"))
    run_launches(overlap_launches(q, k, v, out, cu_q, cu_k, 64, 300, True, TILES[0]))
    assert_matches_reference(out, attention_ref, q, k, v, cu_q, cu_k, causal=True, what="understated max_seqlen_q")


def test_overlap_falls_back_where_it_cannot_run(device):
    """Under the interpreter, off Hopper, for fp32 or an odd head_dim, an entry's overlap runs
    the same tile in the Triton kernel, with the right answer."""
    q, k, v, cu_q, cu_k = inputs((3, 40), (3, 40), 4, 2, 48, torch.float32, device)
    out = torch.full_like(q, float("nan"))
    launches = overlap_launches(q, k, v, out, cu_q, cu_k, 40, 40, True, (32, 16, 4, 1))
    assert launches[-1][0] is _flash_fwd
    run_launches(launches)
    assert_matches_reference(out, attention_ref, q, k, v, cu_q, cu_k, causal=True, what="overlap fallback")


# Run compiled (tests.compiled): this process imported the kernels for the interpreter.
COMPILE_SCHEDULE = """
import json, torch
from minivllm.kernels import compile_check as cc
from minivllm.kernels.flash_attention import prefill_launches
q = torch.randn(256, 8, 128, dtype=torch.bfloat16)
k, v = torch.randn(256, 2, 128, dtype=torch.bfloat16), torch.randn(256, 2, 128, dtype=torch.bfloat16)
cu = torch.tensor([0, 100, 256], dtype=torch.int32)
with cc.recording("sm_90"):
    ((kernel, _, kwargs),) = prefill_launches(q, k, v, torch.empty_like(q), cu, cu, 156, 156, 128**-0.5, causal, None, tile=(128, 64, 8, 2), overlap=True)
ptx = cc.compile_kernel(cc.Launch.from_kwargs(kernel, (), kwargs), "sm_90").asm["ptx"]
print(json.dumps(dict(kernel=kernel.fn.__name__, ptx=ptx)))
"""


@pytest.mark.parametrize("causal", [False, True])
def test_overlap_compiles_for_sm90_with_the_softmax_between_mma_waits(causal, tmp_path):
    """Compiled for sm_90 (no GPU needed): the loop waits for all but one warpgroup MMA (the
    scores are done, P·V still runs), and a basic block computes the softmax's exponentials
    before it waits for the last MMA. A kernel that waited for every MMA before its softmax, as
    Triton's pipeliner schedules flash_attention, fails."""
    done = run_python(f"causal = {causal}\n" + COMPILE_SCHEDULE, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kernel"] == "_flash_fwd_overlap"
    ptx = result["ptx"]
    assert "wgmma.wait_group.sync.aligned 1" in ptx
    blocks = re.split(r"\n\$L__BB\d+_\d+:", ptx)
    assert any(0 <= b.find("ex2.approx") < b.find("wgmma.wait_group.sync.aligned 0") for b in blocks)
    assert "cp.async.bulk.tensor" in ptx


TABLE_KNOB = """
import json, torch
from unittest import mock
from minivllm.kernels import compile_check as cc, flash_attention
from minivllm.kernels.flash_attention import prefill_launches
from minivllm.reference.inputs import paged_cache
entry = {"tile": [128, 64, 8, 2], "tma": True, "overlap": True}
q = torch.randn(300, 8, 128, dtype=torch.bfloat16)
k, v = torch.randn(300, 2, 128, dtype=torch.bfloat16), torch.randn(300, 2, 128, dtype=torch.bfloat16)
cu = torch.tensor([0, 300], dtype=torch.int32)
cache = paged_cache([300], 16, 2, 128, torch.bfloat16, torch.device("cpu"), torch.Generator().manual_seed(0))
seen = {}
for target in ("sm_90", "sm_100"):
    for name, paged, found in (("contiguous", False, entry), ("paged", True, entry), ("gathered", True, entry | {"gather": True})):
        with cc.recording(target), mock.patch.object(flash_attention, "prefill_config", lambda *a, found=found: (found, "table")):
            kk, vv, table = (cache.k_cache, cache.v_cache, cache.block_table) if paged else (k, v, None)
            launches = prefill_launches(q, kk, vv, torch.empty_like(q), cu, cu, 300, 300, 128**-0.5, True, table)
        seen[f"{target} {name}"] = [kernel.fn.__name__ for kernel, _, _ in launches]
print(json.dumps(seen))
"""


def test_a_table_entrys_overlap_picks_the_kernel_where_it_applies(tmp_path):
    """A prefill entry with "overlap": true plans flash_overlap's kernel on sm_90 over contiguous
    keys and after a paged entry's copy of the keys; over pages in place, and on sm_100, the same
    tile runs in the Triton kernel."""
    done = run_python(TABLE_KNOB, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["sm_90 contiguous"] == ["_flash_fwd_overlap"]
    assert seen["sm_90 paged"] == ["_flash_fwd"]
    assert seen["sm_90 gathered"] == ["_gather_pages", "_flash_fwd_overlap"]
    assert seen["sm_100 contiguous"] == ["_flash_fwd"]
    assert seen["sm_100 gathered"] == ["_gather_pages", "_flash_fwd"]
