"""Launch-time facts shared by the wrappers: padded tile widths, SM count, TMA."""

import functools

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor


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


def parallel_slots(device: torch.device, per_sm: int) -> int:
    """Programs the device runs at once when `per_sm` fit on one SM, or a few under the
    interpreter so that CPU tests still exercise split paths."""
    if device.type == "cuda":
        return per_sm * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def tma_ok(t: torch.Tensor, head_dim: int, block_d: int) -> bool:
    """Whether TMA can address t, packed (tokens, heads, head_dim) or a paged cache (blocks,
    page, heads, head_dim), in whole-head boxes: Hopper or later, a power-of-two head_dim,
    contiguous heads and 16-byte aligned strides."""
    return (
        head_dim == block_d
        and t.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(t.device)[0] >= 9
        and t.stride(-1) == 1
        and t.stride(-2) == head_dim
        and all((stride * t.element_size()) % 16 == 0 for stride in t.stride()[:-1])
        and t.data_ptr() % 16 == 0
    )


def tma_descriptor(t: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor of packed (tokens, heads, head_dim) as 2-D (tokens, heads*head_dim), or
    of a paged cache as it is. The box is a placeholder: the caller sets block_shape to its tile before launching."""
    if t.dim() == 4:
        return TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=[1, 16, 1, t.shape[3]])
    return TensorDescriptor(t, shape=[t.shape[0], t.shape[1] * t.shape[2]], strides=[t.stride(0), 1], block_shape=[16, t.shape[2]])
