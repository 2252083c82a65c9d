"""paged_attention_decode against both decode references (loop and gather)."""

import pytest
import torch
from hypothesis import given

from kernels import paged_attention_decode
from kernels.paged_attention import launch_decode
from reference import paged_decode_gather, paged_decode_loop
from tests.cases import DecodeCase, decode_cases, generator, paged_cache, randn
from tests.tolerance import assert_within_tolerance


def run_case(case, device, *, max_context_len=None):
    gen = generator(case.seed, device)
    cache = paged_cache(case.context_lens, case.block_size, case.num_kv_heads, case.head_dim, case.dtype, device, gen)
    q = randn((len(case.context_lens), case.num_heads, case.head_dim), case.dtype, device, gen)
    ctx = torch.tensor(case.context_lens, dtype=torch.int32, device=device)
    args = (q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    out = torch.full_like(q, float("nan"))
    paged_attention_decode(*args, num_splits=case.num_splits, max_context_len=max_context_len, out=out)
    ref64 = paged_decode_gather(*args, compute_dtype=torch.float64)
    assert_within_tolerance(out, ref64, paged_decode_gather(*args), f"{case} vs gather")
    assert_within_tolerance(out, ref64, paged_decode_loop(*args), f"{case} vs loop")


@given(case=decode_cases())
def test_decode_matches_references(case, device):
    run_case(case, device)


@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 64])
def test_splits_and_block_sizes(block_size, num_splits, device):
    """More splits than tiles leaves empty splits, which the merge must ignore."""
    case = DecodeCase(context_lens=(1, 37, 70, 16), num_heads=10, num_kv_heads=2, head_dim=111,
                      dtype=torch.bfloat16, block_size=block_size, num_splits=num_splits, seed=5)
    run_case(case, device)


def test_max_context_len_sizes_splits(device):
    case = DecodeCase(context_lens=(9, 40), num_heads=5, num_kv_heads=1, head_dim=64,
                      dtype=torch.float16, block_size=4, num_splits=None, seed=2)
    run_case(case, device, max_context_len=40)


def test_context_longer_than_table_row_is_nan_on_device(device):
    """On a GPU the host cannot see context_lens without a sync: an overflowing row is NaN,
    never another row's data. On the CPU the wrapper sees it and raises instead."""
    gen = generator(4, device)
    cache = paged_cache((20, 20), 4, 2, 32, torch.float16, device, gen)
    q = randn((2, 4, 32), torch.float16, device, gen)
    capacity = cache.block_table.shape[1] * 4
    ctx = torch.tensor([20, capacity + 1], dtype=torch.int32, device=device)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="context_lens"):
            paged_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
        return
    out = paged_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    assert torch.isfinite(out[0]).all() and out[1].isnan().all()


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("tile", [(16, 4, 2), (32, 4, 3), (128, 8, 3)])
def test_tuning_variants_match_the_reference(tile, tma, device):
    """launch_decode's tile and TMA overrides (benchmarks/tune_decode.py) compute the same
    function; TMA applies on a Hopper GPU with pages that hold whole tiles, elsewhere it is
    ignored and the pointer path runs."""
    gen = generator(11, device)
    lens = (1, 200, 256, 97)
    cache = paged_cache(lens, 128, 2, 64, torch.bfloat16, device, gen)
    q = randn((len(lens), 8, 64), torch.bfloat16, device, gen)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    out = torch.full_like(q, float("nan"))
    launch_decode(*args, out, max(lens), 64**-0.5, num_splits=2, tile=tile, tma=tma)
    ref64 = paged_decode_gather(*args, compute_dtype=torch.float64)
    assert_within_tolerance(out, ref64, paged_decode_gather(*args), f"tile {tile} tma={tma}")

