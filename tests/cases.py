"""Hypothesis strategies for attention problems; minivllm/reference/inputs.py builds their tensors.

Shapes are bounded by the active hypothesis profile: small for the CPU interpreter (`ci`, `dev`),
up to 8k-token sequences on a GPU (`gpu`).
"""

from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st

from minivllm.reference.inputs import LAYOUT_NAMES


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


# How every input tensor lies in memory (reference.inputs.as_layout): contiguous half the time.
LAYOUTS = st.sampled_from(["contiguous", *LAYOUT_NAMES])
