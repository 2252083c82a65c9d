"""The benchmarks' correctness gate for paged decode: a few sequences of a batch checked against
the float64 reference, so a large batch costs no more to check than a small one."""

import torch

from .paged_decode import paged_decode_gather
from .tolerance import assert_matches_reference

CHECKED_SEQUENCES = 3  # first, middle and last of the batch


def check_decode(out, q, cache, context_lens, what):
    """The first, middle and last sequences of the batch against the float64 reference.

    out and q: (batch, H, D); cache: a reference.inputs.PagedCache holding the batch's K and V;
    context_lens: int (batch,)."""
    batch = q.shape[0]
    rows = torch.tensor(sorted({0, batch // 2, batch - 1})[:CHECKED_SEQUENCES], device=q.device)
    args = (q[rows], cache.k_cache, cache.v_cache, cache.block_table[rows], context_lens[rows])
    assert_matches_reference(out[rows], paged_decode_gather, *args, what=what)
