"""flash-attn's accuracy rule: a kernel may be at most twice as far from the float64 answer as
PyTorch computing in the kernel's own dtype, plus a small floor for outputs that the
same-dtype reference happens to get exactly right."""

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


class ToleranceError(AssertionError):
    """An output that breaks the rule. Raised explicitly, never by `assert`, so `python -O` keeps
    the check (the tuner times only what passes it); an AssertionError, so pytest reports it as
    a failed test."""


def assert_within_tolerance(out: torch.Tensor, ref_fp64: torch.Tensor, ref_same_dtype: torch.Tensor, what: str = "") -> None:
    """max|out - ref_fp64| <= 2 * max|ref_same_dtype - ref_fp64| + FLOOR[out.dtype]; ToleranceError
    when not, or when out has another shape or holds NaN."""
    if out.shape != ref_fp64.shape:
        raise ToleranceError(f"{what}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}")
    if out.isnan().any():
        raise ToleranceError(f"{what}: output holds NaN (unwritten or poisoned rows)")
    if out.numel() == 0:
        return
    err = (out.double() - ref_fp64).abs().max().item()
    ref_err = (ref_same_dtype.double() - ref_fp64).abs().max().item()
    bound = 2 * ref_err + FLOOR[out.dtype]
    if not err <= bound:  # `not <=`: a NaN error fails too
        raise ToleranceError(f"{what}: max error {err:.3g} > bound {bound:.3g} (same-dtype reference error {ref_err:.3g})")


def assert_matches_reference(out: torch.Tensor, reference_fn, *args, what: str = "", **kwargs) -> torch.Tensor:
    """The rule against a reference that takes compute_dtype (attention_ref, paged_decode_gather,
    paged_decode_loop): runs reference_fn(*args, **kwargs) in float64 and in the inputs' own
    dtype, raises ToleranceError unless out is within tolerance, and returns the float64 answer
    for further checks."""
    ref_fp64 = reference_fn(*args, compute_dtype=torch.float64, **kwargs)
    assert_within_tolerance(out, ref_fp64, reference_fn(*args, **kwargs), what)
    return ref_fp64
