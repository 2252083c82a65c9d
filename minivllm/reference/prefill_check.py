"""The benchmarks' correctness gate for prefill, with or without a cached prefix: windows of a
long output checked against the float64 reference, so no full score matrix is ever built."""

from .attention import attention_ref
from .inputs import cu_seqlens
from .tolerance import assert_matches_reference

CHECK_ROWS = 128  # query rows checked at each end of a sequence


def check_prefill(out, q, k, v, batch, new, causal, what, *, prefix=0):
    """The first and last CHECK_ROWS query rows of the first and last sequence, against float64.

    `batch` sequences of `prefix` cached keys followed by `new` tokens, packed: q and out hold
    (batch * new, H, D), k and v (batch * (prefix + new), Hkv, D); prefix 0 is plain prefill.
    New rows [a, e) of a causal sequence see keys [0, prefix + e) under the bottom-right aligned
    mask, all keys otherwise, so each window is checked as its own short-query problem."""
    rows = min(new, CHECK_ROWS)
    label = "new rows" if prefix else "rows"
    for b in sorted({0, batch - 1}):
        for a in sorted({0, new - rows}):
            e, start = a + rows, b * (prefix + new)
            keys = prefix + e if causal else prefix + new
            qs, ks, vs = q[b * new + a : b * new + e], k[start : start + keys], v[start : start + keys]
            cu_q, cu_k = cu_seqlens([rows], q.device), cu_seqlens([keys], q.device)
            assert_matches_reference(out[b * new + a : b * new + e], attention_ref, qs, ks, vs, cu_q, cu_k, causal=causal, what=f"{what}, sequence {b}, {label} {a}..{e}")
