"""paged_attention_decode against both decode references (loop and gather)."""

import pytest
import torch
from hypothesis import given

from minivllm.kernels import paged_attention_decode
from minivllm.kernels.paged_attention import DecodeConfig, launch_decode, tma_able
from minivllm.reference import paged_decode_gather, paged_decode_loop
from minivllm.reference.inputs import as_layout, generator, paged_cache, randn
from minivllm.reference.tolerance import assert_matches_reference, assert_within_tolerance
from tests.cases import DecodeCase, decode_cases


def run_case(case, device, *, max_context_len=None):
    gen = generator(case.seed, device)
    cache = paged_cache(case.context_lens, case.block_size, case.num_kv_heads, case.head_dim, case.dtype, device, gen)
    q = randn((len(case.context_lens), case.num_heads, case.head_dim), case.dtype, device, gen)
    ctx = torch.tensor(case.context_lens, dtype=torch.int32, device=device)
    args = tuple(as_layout(t, case.layout) for t in (q, cache.k_cache, cache.v_cache, cache.block_table, ctx))
    out = torch.full_like(q, float("nan"))
    paged_attention_decode(*args, num_splits=case.num_splits, max_context_len=max_context_len, out=out)
    ref64 = assert_matches_reference(out, paged_decode_gather, *args, what=f"{case} vs gather")
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


@pytest.mark.parametrize("page", [16, 128])
@pytest.mark.parametrize(
    "config",
    [DecodeConfig("gather", 16, 4, 2, 2), DecodeConfig("gather", 64, 4, 3, 4), DecodeConfig("gather", 128, 8, 3, 1),
     DecodeConfig("tma", 16, 4, 6, 4), DecodeConfig("tma", 32, 4, 6, 2)],
    ids=lambda c: f"{c.fetch}-{c.block_n}-{c.num_warps}-{c.num_stages}-{c.programs_per_sm}",
)
def test_tuning_candidates_match_the_reference(config, page, device):
    """Every candidate the tuner may put in a table computes the same function: gathered tiles
    longer than a page (spanning scattered pages) or within one, and TMA boxes where the device
    has TMA; contexts end mid-tile, mid-page and on a page edge."""
    head_dim = 64
    if config.fetch == "tma" and not (tma_able(*(torch.empty(1, page, 2, head_dim, dtype=torch.bfloat16, device=device),) * 2, head_dim) and page % config.block_n == 0):
        pytest.skip("TMA needs a Hopper-class GPU and pages holding whole tiles")
    gen = generator(11, device)
    lens = (1, 200, 256, 97)
    cache = paged_cache(lens, page, 2, head_dim, torch.bfloat16, device, gen)
    q = randn((len(lens), 8, head_dim), torch.bfloat16, device, gen)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    for splits in (None, 3):
        out = torch.full_like(q, float("nan"))
        launch_decode(*args, out, max(lens), head_dim**-0.5, config, num_splits=splits)
        assert_matches_reference(out, paged_decode_gather, *args, what=f"{config}, splits {splits}")
