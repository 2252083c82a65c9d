"""Builders of the kernels' inputs, shared by the tests and the benchmarks: seeded random tensors,
cu_seqlens, a paged KV cache with a scattered block table, and strided views of a tensor.

Inputs are random normal, never zeros; block tables are scattered with randperm and padded
with -1; caches hold NaN in the slots no sequence owns.
"""

from dataclasses import dataclass

import torch

# How an input tensor may lie in memory (as_layout). "padded": rows (or, for 1-D tensors,
# elements) sit apart in a larger buffer whose gaps hold poison; "transposed": the first two dims
# are swapped in memory. Both are views equal to the tensor, so a kernel that ignores strides
# reads the wrong elements or the poison.
LAYOUT_NAMES = ("contiguous", "padded", "transposed")


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """An equal view of t laid out as `layout` (see LAYOUT_NAMES); float gaps hold NaN, int gaps -7.
    The last dim of a 2-D-or-more tensor stays contiguous, as the kernels require for features."""
    if layout == "contiguous":
        return t
    poison = float("nan") if t.is_floating_point() else -7
    if layout == "padded" or t.dim() == 1:
        wide = torch.full((*t.shape, 2) if t.dim() == 1 else (*t.shape[:-1], t.shape[-1] + 3), poison, dtype=t.dtype, device=t.device)
        view = wide[..., 0] if t.dim() == 1 else wide[..., : t.shape[-1]]
    else:
        view = torch.full((t.shape[1], t.shape[0], *t.shape[2:]), poison, dtype=t.dtype, device=t.device).transpose(0, 1)
    view.copy_(t)
    return view


def generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, dtype, device, gen) -> torch.Tensor:
    # Drawn in the target dtype: a float32 draw first would double the peak memory of the
    # benchmarks' multi-GB caches.
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def cu_seqlens(lens, device) -> torch.Tensor:
    """int32 (batch+1,) prefix sums of `lens`."""
    return torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)


@dataclass
class PagedCache:
    k_cache: torch.Tensor  # (num_blocks, block_size, num_kv_heads, head_dim): random where owned, NaN elsewhere
    v_cache: torch.Tensor
    block_table: torch.Tensor  # int32 (batch, max_blocks_per_seq), scattered, -1 padded


def paged_cache(lens, block_size, num_kv_heads, head_dim, dtype, device, gen, spare_blocks=3) -> PagedCache:
    """A cache holding sequences of `lens` tokens in scattered blocks, with spare blocks that no
    sequence owns and one padding column of -1 in the table. Every slot no sequence owns (spare
    blocks, the tail of each last block) is NaN, as an engine's never-cleared cache may be: an
    implementation that lets one reach its output fails."""
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    ids = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    table = torch.full((len(lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32, device=device)
    used = 0
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
    for b, (n, length) in enumerate(zip(blocks_per_seq, lens, strict=True)):
        table[b, :n] = ids[used : used + n]
        owned[ids[used : used + n].long()] = True
        if length % block_size:
            owned[ids[used + n - 1].long(), length % block_size :] = False
        used += n
    k, v = randn(shape, dtype, device, gen), randn(shape, dtype, device, gen)
    k[~owned] = v[~owned] = float("nan")
    return PagedCache(k, v, table)


def share_prefix(cache: PagedCache, lens, shared_blocks: int) -> PagedCache:
    """`cache` (paged_cache's, for sequences of `lens` tokens) with the first shared_blocks blocks
    of every sequence at least that long replaced by row 0's, as a prefix cache shares one prompt.
    The blocks given up hold NaN, so reading them shows. Row 0 must hold the shared blocks."""
    page = cache.k_cache.shape[1]
    if lens[0] < shared_blocks * page:
        raise ValueError(f"row 0 holds {lens[0]} tokens, fewer than the {shared_blocks * page} shared")
    table = cache.block_table.clone()
    k, v = cache.k_cache.clone(), cache.v_cache.clone()
    for b, n in enumerate(lens[1:], start=1):
        if n >= shared_blocks * page:
            given_up = table[b, :shared_blocks].long()
            k[given_up] = v[given_up] = float("nan")
            table[b, :shared_blocks] = table[0, :shared_blocks]
    return PagedCache(k, v, table)
