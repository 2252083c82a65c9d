"""The row count a prefill step runs its matmuls at: the step's token count rounded up a ladder of
eight sizes per octave.

Why: cuBLAS picks a GEMM algorithm per problem shape on first sight, and on an H100 that costs
about 290 µs of host time per `F.linear` against 25 µs for a shape seen before (benchmarks/NOTES.md).
A prefill step brings a new token count nearly every time, so its ~113 matmuls (Qwen3-0.6B) paid
some 30 ms of host time a step, which no async scheduling hides. On the ladder, steps repeat a few
dozen sizes, and the padding costs at most an eighth more rows."""

# Below this many tokens the rung is a multiple of it: small steps cost little either way.
MIN_STEP = 16
RUNGS_PER_OCTAVE = 8


def padded_token_count(num_tokens: int, cap: int) -> int:
    """num_tokens (>= 1) rounded up to the ladder, but never past `cap` (the step budget the
    engine's activation memory was sized for) unless num_tokens itself is."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    # Counts in (2^(b-1), 2^b] step by 2^(b-1) / RUNGS_PER_OCTAVE.
    step = max(MIN_STEP, (1 << (num_tokens - 1).bit_length()) // (2 * RUNGS_PER_OCTAVE))
    return max(num_tokens, min(-(-num_tokens // step) * step, cap))
