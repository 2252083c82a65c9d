"""Hypothesis strategies for attention problems, and the builders that turn them into tensors.

Shapes are bounded by the active hypothesis profile: small for the CPU interpreter (`ci`, `dev`),
up to 8k-token sequences on a GPU (`gpu`). Inputs are random normal, never zeros; block tables
are scattered with randperm and padded with -1; caches hold random data in unused slots.
"""

from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_len: int  # longest query run or decode context
    max_prefix: int  # longest cached prefix ahead of the new tokens


LIMITS = {
    "ci": Limits(max_batch=3, max_len=48, max_prefix=40),
    "dev": Limits(max_batch=3, max_len=64, max_prefix=64),
    "gpu": Limits(max_batch=8, max_len=8192, max_prefix=8192),
}

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HEAD_DIMS = [16, 32, 59, 64, 80, 96, 111, 128, 256]
# (num_heads, num_kv_heads): MHA, GQA at powers of two and not (5:1, 6:3), MQA.
HEAD_PAIRS = [(1, 1), (4, 4), (8, 2), (6, 3), (5, 1), (8, 1), (12, 4), (2, 2)]
BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# Lengths around the interpreter's and the GPU's tile edges.
EDGE_LENGTHS = [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129]


def limits() -> Limits:
    name = settings.get_current_profile_name() if hasattr(settings, "get_current_profile_name") else settings._current_profile
    return LIMITS.get(name, LIMITS["dev"])


def lengths(low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly short, sometimes at a tile edge, sometimes anywhere up to `high`."""
    edges = [n for n in EDGE_LENGTHS if low <= n <= high]
    short = st.integers(low, min(high, max(low, 40)))
    return st.one_of(short, st.sampled_from(edges), st.integers(low, high)) if edges else short


@dataclass(frozen=True)
class AttnCase:
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    block_size: int | None  # None: contiguous K/V; else a paged cache
    seed: int
    layout: str = "contiguous"  # how every input tensor lies in memory (as_layout)


@st.composite
def attn_cases(draw, paged: bool) -> AttnCase:
    lim = limits()
    batch = draw(st.integers(1, lim.max_batch))
    q_lens = tuple(draw(lengths(1, lim.max_len)) for _ in range(batch))
    prefixes = tuple(draw(st.one_of(st.just(0), lengths(1, lim.max_prefix))) for _ in range(batch))
    num_heads, num_kv_heads = draw(st.sampled_from(HEAD_PAIRS))
    return AttnCase(
        q_lens=q_lens,
        k_lens=tuple(q + p for q, p in zip(q_lens, prefixes, strict=True)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()),
        block_size=draw(st.sampled_from(BLOCK_SIZES)) if paged else None,
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=draw(LAYOUTS),
    )


@dataclass(frozen=True)
class DecodeCase:
    context_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    num_splits: int | None
    seed: int
    layout: str = "contiguous"


@st.composite
def decode_cases(draw) -> DecodeCase:
    lim = limits()
    batch = draw(st.integers(1, 4 * lim.max_batch))
    num_heads, num_kv_heads = draw(st.sampled_from(HEAD_PAIRS))
    return DecodeCase(
        context_lens=tuple(draw(lengths(1, lim.max_len)) for _ in range(batch)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(DTYPES)),
        block_size=draw(st.sampled_from(BLOCK_SIZES)),
        num_splits=draw(st.sampled_from([None, None, 1, 2, 5])),
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=draw(LAYOUTS),
    )


# "padded": rows (or, for 1-D tensors, elements) sit apart in a larger buffer whose gaps hold
# poison; "transposed": the first two dims are swapped in memory. Both are views equal to the
# tensor, so a kernel that ignores strides reads the wrong elements or the poison.
LAYOUTS = st.sampled_from(["contiguous", "contiguous", "padded", "transposed"])


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """An equal view of t laid out as `layout` (see LAYOUTS); float gaps hold NaN, int gaps -7.
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
