"""What the tuning tools (tune_prefill, tune_decode) share: check a variant, then time it; save the rows."""

import json
from collections.abc import Callable

import torch

from benchmarks.timing import Prelude, median_device_s

MAX_REL_ERR = 2e-2  # relative L2 error against the reference a timed variant may have


def checked_median_ms(name: str, fn: Callable[[], object], output: Callable[[object], torch.Tensor], expected: torch.Tensor, prelude: Prelude, check: bool = True) -> tuple[float, float] | None:
    """(median ms, relative error) of `fn`, or None after printing why it was not timed.

    `output(fn())` is the variant's result in `expected`'s layout; with `check` its relative L2
    error must be finite and below MAX_REL_ERR before it is timed the way the suites time it
    (benchmarks/timing.py: CUDA events, L2 rewritten and the host's launch covered before each
    call, so a short kernel is not timed as its launch). A variant that raises (a backend
    refusing the shape) or is wrong is reported and skipped."""
    try:
        got = output(fn()).float()
        err = ((got - expected).norm() / expected.norm()).item()
        if check and not err < MAX_REL_ERR:
            raise AssertionError(f"relative error {err:.2e} against the reference")
        return 1e3 * median_device_s(fn, prelude), err
    except Exception as e:
        print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        return None


def write_rows(path: str, ceiling: dict, rows: list[dict]) -> None:
    """The card, its ceilings and every timed row, as JSON."""
    with open(path, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), ceilings=ceiling, rows=rows), f, indent=1)
