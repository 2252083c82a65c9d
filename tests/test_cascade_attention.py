"""cascade_attention_decode against the plain decode references: rows that share a prefix of
cached blocks, rows too short to hold it, and every shared length from none to a whole context."""

import pytest
import torch

from minivllm.kernels import paged_attention_decode
from minivllm.kernels.cascade_attention import cascade_attention_decode
from minivllm.reference import paged_decode_gather
from minivllm.reference.inputs import generator, paged_cache, randn, share_prefix
from minivllm.reference.tolerance import assert_matches_reference


def shared_case(lens, shared_blocks, page, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    gen = generator(seed, device)
    cache = share_prefix(paged_cache(lens, page, num_kv_heads, head_dim, dtype, device, gen), lens, shared_blocks)
    q = randn((len(lens), num_heads, head_dim), dtype, device, gen)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    shared = torch.tensor([shared_blocks * page], dtype=torch.int32, device=device)
    return q, cache, ctx, shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(6, 2, 40), (10, 2, 111), (3, 3, 64), (16, 1, 32)])
@pytest.mark.parametrize(("page", "shared_blocks"), [(4, 3), (16, 1), (1, 13)])
def test_cascade_matches_plain_decode(dtype, num_heads, num_kv_heads, head_dim, page, shared_blocks, device):
    """Rows end mid-block, on a block edge and right at the prefix's end (an empty suffix); row 3
    is shorter than the prefix and attends to its own blocks."""
    shared = shared_blocks * page
    lens = (shared + 7, shared + 1, shared + page, max(1, shared - 2), shared, shared + 2 * page + 3)
    q, cache, ctx, shared_len = shared_case(lens, shared_blocks, page, num_heads, num_kv_heads, head_dim, dtype, device)
    out = torch.full_like(q, float("nan"))
    cascade_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx, shared_len, out=out)
    assert_matches_reference(out, paged_decode_gather, q, cache.k_cache, cache.v_cache, cache.block_table, ctx, what="cascade vs gather")


@pytest.mark.parametrize("shared_blocks", [0, 2, 5])
def test_any_shared_length_below_the_bound(shared_blocks, device):
    """One launch shape (max_shared_len fixed, as a CUDA graph holds it) for any shared length."""
    lens = (23, 21, 40, 20)
    q, cache, ctx, shared_len = shared_case(lens, shared_blocks, 4, 8, 2, 64, torch.bfloat16, device, seed=shared_blocks)
    out = cascade_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx, shared_len, max_context_len=40, max_shared_len=40)
    assert_matches_reference(out, paged_decode_gather, q, cache.k_cache, cache.v_cache, cache.block_table, ctx, what="cascade vs gather")
    plain = paged_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    torch.testing.assert_close(out, plain, atol=2e-2, rtol=2e-2)


def test_many_rows_span_several_row_tiles(device):
    """More rows than one program's query tile holds, and a prefix split across programs."""
    lens = tuple(64 + 3 * i for i in range(37))
    q, cache, ctx, shared_len = shared_case(lens, 4, 16, 4, 2, 64, torch.float16, device, seed=9)
    out = cascade_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx, shared_len)
    assert_matches_reference(out, paged_decode_gather, q, cache.k_cache, cache.v_cache, cache.block_table, ctx, what="cascade vs gather")


@pytest.mark.parametrize("lens", [(70, 90), (91, 33, 64)])
def test_few_rows_split_the_prefix_and_each_suffix(lens, device):
    """Few rows leave the device idle, so both kernels split: the prefix across programs, and each
    row's own suffix evenly over the decode's splits, however far the prefix reaches into them."""
    q, cache, ctx, shared_len = shared_case(lens, 2, 16, 4, 1, 64, torch.bfloat16, device, seed=len(lens))
    out = cascade_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx, shared_len, max_context_len=max(lens))
    assert_matches_reference(out, paged_decode_gather, q, cache.k_cache, cache.v_cache, cache.block_table, ctx, what="cascade vs gather")


def test_bad_shared_len_raises(device):
    """On the CPU the wrapper reads shared_len and refuses one that breaks the contract (on a GPU
    it would need a sync, so the contract is the caller's there)."""
    if device.type != "cpu":
        pytest.skip("shared_len is read on the host only where the kernels run in the interpreter")
    cpu = device
    lens = (12, 9)
    q, cache, ctx, _ = shared_case(lens, 2, 4, 4, 2, 32, torch.float32, cpu)
    args = (q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    eight = torch.tensor([8], dtype=torch.int32)
    with pytest.raises(ValueError, match="shared_len must be a multiple of the block size"):
        cascade_attention_decode(*args, torch.tensor([6], dtype=torch.int32))
    with pytest.raises(ValueError, match="shared_len must be a multiple of the block size .* max_shared_len = 4"):
        cascade_attention_decode(*args, eight, max_shared_len=4)
    with pytest.raises(ValueError, match="shared_len must have dtype torch.int32"):
        cascade_attention_decode(*args, eight.long())
    with pytest.raises(ValueError, match="max_shared_len must be in"):
        cascade_attention_decode(*args, eight, max_shared_len=99)
    own = paged_cache(lens, 4, 2, 32, torch.float32, cpu, generator(1, cpu))
    with pytest.raises(ValueError, match="row 0's first 2 blocks"):
        cascade_attention_decode(q, own.k_cache, own.v_cache, own.block_table, ctx, eight)
