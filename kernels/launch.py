"""Launch-time facts shared by the wrappers: interpreter mode, padded tile widths, SM count."""

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def head_dim_block(head_dim: int) -> int:
    """head_dim padded to a power of two, at least 16 so that tl.dot accepts it; lanes past
    head_dim are masked on load and store."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products; tf32 would break the fp32 tolerance."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_slots(device: torch.device) -> int:
    """Programs needed to fill the device: two per SM on a GPU, a few under the interpreter
    so that CPU tests still exercise split paths."""
    if device.type == "cuda":
        return 2 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8
