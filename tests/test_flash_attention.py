"""flash_attn_varlen against the float64 and same-dtype PyTorch references."""

import pytest
import torch
from hypothesis import given

from minivllm.kernels import flash_attention, flash_attn_varlen, store_kvcache
from minivllm.kernels.flash_attention import INTERPRETER_TILE, flash_fwd_tuned, prefill_launches, prune_tiles, run_launches, tile_of, tiles_for
from minivllm.reference import attention_ref
from minivllm.reference.inputs import as_layout, cu_seqlens, generator, paged_cache, randn
from minivllm.reference.tolerance import assert_matches_reference
from tests.cases import AttnCase, attn_cases


def run_case(case, device):
    """Builds the case's inputs, runs the kernel into a NaN-poisoned buffer, checks tolerance."""
    gen = generator(case.seed, device)
    q = randn((sum(case.q_lens), case.num_heads, case.head_dim), case.dtype, device, gen)
    cu_q, cu_k = cu_seqlens(case.q_lens, device), cu_seqlens(case.k_lens, device)
    if case.block_size is None:
        kv_shape = (sum(case.k_lens), case.num_kv_heads, case.head_dim)
        k, v, table = randn(kv_shape, case.dtype, device, gen), randn(kv_shape, case.dtype, device, gen), None
    else:
        cache = paged_cache(case.k_lens, case.block_size, case.num_kv_heads, case.head_dim, case.dtype, device, gen)
        k, v, table = cache.k_cache, cache.v_cache, cache.block_table
    q, k, v, cu_q, cu_k = (as_layout(t, case.layout) for t in (q, k, v, cu_q, cu_k))
    table = None if table is None else as_layout(table, case.layout)
    out = torch.full_like(q, float("nan"))
    flash_attn_varlen(q, k, v, cu_q, cu_k, max(case.q_lens), max(case.k_lens), causal=case.causal, block_table=table, out=out)
    assert_matches_reference(out, attention_ref, q, k, v, cu_q, cu_k, causal=case.causal, block_table=table, what=str(case))


@given(case=attn_cases(paged=False))
def test_contiguous_matches_reference(case, device):
    run_case(case, device)


@given(case=attn_cases(paged=True))
def test_paged_prefix_matches_reference(case, device):
    run_case(case, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_lengths_crossing_tiles_and_blocks(dtype, causal, device):
    """Lq and Lk just off the tile edges, with a prefix that ends mid-block."""
    case_kw = dict(num_heads=6, num_kv_heads=2, head_dim=80, dtype=dtype, causal=causal, seed=7)

    run_case(AttnCase(q_lens=(1, 33, 47), k_lens=(1, 50, 79), block_size=None, **case_kw), device)
    run_case(AttnCase(q_lens=(1, 33, 47), k_lens=(18, 50, 79), block_size=16, **case_kw), device)


def test_causal_rows_that_see_no_key_are_zero(device):
    """With Lq > Lk, bottom-right alignment leaves the first Lq - Lk queries with no key."""
    gen = generator(3, device)
    q = randn((9, 2, 59), torch.float16, device, gen)
    k, v = randn((4, 1, 59), torch.float16, device, gen), randn((4, 1, 59), torch.float16, device, gen)
    cu_q, cu_k = cu_seqlens([9], device), cu_seqlens([4], device)
    out = flash_attn_varlen(q, k, v, cu_q, cu_k, 9, 4, causal=True)
    assert torch.equal(out[:5], torch.zeros_like(out[:5]))
    assert_matches_reference(out, attention_ref, q, k, v, cu_q, cu_k)


def test_prefix_prefill_after_store(device):
    """The engine's path: store the new tokens' K/V, then attend over cached prefix + new tokens."""
    gen = generator(11, device)
    prefix, new, heads, kv_heads, dim = (20, 0, 35), (13, 1, 9), 4, 2, 96
    k_lens = tuple(p + n for p, n in zip(prefix, new, strict=True))
    cache = paged_cache(k_lens, 8, kv_heads, dim, torch.bfloat16, device, gen)
    q = randn((sum(new), heads, dim), torch.bfloat16, device, gen)
    k_new = randn((sum(new), kv_heads, dim), torch.bfloat16, device, gen)
    v_new = randn((sum(new), kv_heads, dim), torch.bfloat16, device, gen)
    slots = torch.cat([
        cache.block_table[b, pos // 8].long() * 8 + pos % 8
        for b, pos in enumerate(torch.arange(p, p + n, device=device) for p, n in zip(prefix, new, strict=True))
    ])
    store_kvcache(k_new, v_new, cache.k_cache, cache.v_cache, slots)
    cu_q, cu_k = cu_seqlens(new, device), cu_seqlens(k_lens, device)
    out = flash_attn_varlen(q, cache.k_cache, cache.v_cache, cu_q, cu_k, max(new), max(k_lens), block_table=cache.block_table)
    args = (q, cache.k_cache, cache.v_cache, cu_q, cu_k)
    assert_matches_reference(out, attention_ref, *args, block_table=cache.block_table)


def test_understated_max_seqlen_q_still_writes_every_row(device):
    gen = generator(5, device)
    q, k, v = (randn((70, 2, 32), torch.float16, device, gen) for _ in range(3))
    cu = cu_seqlens([70], device)
    out = flash_attn_varlen(q, k, v, cu, cu, 0, 70, out=torch.full_like(q, float("nan")))
    assert_matches_reference(out, attention_ref, q, k, v, cu, cu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
def test_every_tile_candidate_fits_a_paged_tma_box(dtype, block_d):
    """The wrapper uses paged TMA when the page is at least every candidate's BLOCK_N, which
    then divides it only if both are powers of two; tl.arange needs power-of-two tiles too."""
    tiles = tiles_for(block_d, dtype)
    assert tiles
    for block_m, block_n, num_warps, num_stages in tiles:
        assert block_n <= 128 and block_n & (block_n - 1) == 0 and block_m & (block_m - 1) == 0
        assert num_warps in (4, 8) and num_stages >= 1


def test_autotune_prune_reads_keyword_launch_arguments():
    """Launches pass every argument by keyword, and Triton's autotuner then hands the prune hook
    an empty named_args: the hook must find the output's dtype among the keywords."""
    out = torch.empty(1, 1, 128, dtype=torch.bfloat16)
    kept = prune_tiles(list(flash_fwd_tuned.configs), {}, O=out, BLOCK_D=128)
    assert sorted(tile_of(c) for c in kept) == sorted(tiles_for(128, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_keys_copied_out_of_the_cache_first(dtype, causal, block_size, device):
    """The `gather` config: the keys of a scattered cache copied into packed rows, then the
    contiguous kernel; prefixes ending mid-block, a sequence with one key, queries past the tile
    edge, an odd head_dim, and the output buffer poisoned first."""
    gen = generator(17, device)
    q_lens, k_lens = (1, 33, 47), (1, 50, 79)
    q = randn((sum(q_lens), 6, 80), dtype, device, gen)
    cache = paged_cache(k_lens, block_size, 2, 80, dtype, device, gen)
    cu_q, cu_k = cu_seqlens(q_lens, device), cu_seqlens(k_lens, device)
    args = (q, cache.k_cache, cache.v_cache)
    tile = INTERPRETER_TILE if device.type == "cpu" else tiles_for(128, dtype)[0]
    out = torch.full_like(q, float("nan"))
    launches = prefill_launches(*args, out, cu_q, cu_k, 47, 79, 80**-0.5, causal, cache.block_table, tile=tile, gather=True)
    assert [kernel.fn.__name__ for kernel, _, _ in launches] == ["_gather_pages", "_flash_fwd"]
    run_launches(launches)
    assert_matches_reference(out, attention_ref, *args, cu_q, cu_k, causal=causal, block_table=cache.block_table, what=f"gather, page {block_size}")


def test_copied_keys_of_a_context_longer_than_its_table_row_give_nan(device):
    """As the paged kernel poisons such a sequence (the host cannot see context lengths without a
    sync), the copy does: its values become NaN, and the sequence's output with them; the other
    sequence is untouched."""
    gen = generator(19, device)
    cache = paged_cache((20, 20), 4, 1, 32, torch.float16, device, gen)
    q = randn((10, 2, 32), torch.float16, device, gen)
    capacity = cache.block_table.shape[1] * 4
    cu_q = cu_seqlens([5, 5], device)
    cu_k = cu_seqlens([20, capacity + 3], device)
    out = torch.zeros_like(q)
    tile = INTERPRETER_TILE if device.type == "cpu" else tiles_for(32, torch.float16)[0]
    run_launches(prefill_launches(q, cache.k_cache, cache.v_cache, out, cu_q, cu_k, 5, capacity + 3, 32**-0.5, True, cache.block_table,
                                  tile=tile, gather=True))
    assert torch.isfinite(out[:5]).all() and out[5:].isnan().all()


def test_the_tables_gather_applies_past_one_query_tile(monkeypatch, device):
    """A table entry's `gather` copies the keys out only when a sequence brings more queries than
    one tile holds; a few new tokens over a long prefix read the cache in place."""
    tile = INTERPRETER_TILE if device.type == "cpu" else tiles_for(128, torch.bfloat16)[0]
    monkeypatch.setattr(flash_attention, "prefill_config", lambda *args: ({"tile": list(tile), "tma": False, "gather": True}, "table"))
    gen = generator(23, device)
    cache = paged_cache((300,), 16, 1, 128, torch.bfloat16, device, gen)
    for new, kernels in ((tile[0] + 1, ["_gather_pages", "_flash_fwd"]), (tile[0], ["_flash_fwd"])):
        q = randn((new, 2, 128), torch.bfloat16, device, gen)
        launches = prefill_launches(q, cache.k_cache, cache.v_cache, torch.empty_like(q), cu_seqlens([new], device), cu_seqlens([300], device),
                                    new, 300, 128**-0.5, True, cache.block_table)
        assert [kernel.fn.__name__ for kernel, _, _ in launches] == kernels
        assert launches[-1][2]["PAGED"] == (len(kernels) == 1)
