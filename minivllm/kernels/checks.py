"""Argument checks shared by the kernel wrappers.

Every check raises ValueError naming the argument and what was expected. None of them reads
device memory, so the wrappers never synchronise with the host; contents are only checked
when the tensor already lives on the CPU. The checks of index tensors (cu_seqlens, block tables,
context lengths, slot mappings) return them contiguous, since the kernels index them densely: a
strided view is copied on the way in (a device copy, no sync) rather than misread.
"""

import torch

from minivllm.interpreter import interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 256


def check_rank(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_kernel_device(**tensors: torch.Tensor) -> None:
    """Every tensor is on a CUDA device unless Triton runs in its interpreter: a compiled kernel
    cannot address host memory, and Triton's own error names no argument."""
    if interpreting():
        return
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device} but Triton compiles for cuda here; pass CUDA tensors "
                             "(or choose the interpreter before the kernels are imported: minivllm.interpret_without_gpu() or TRITON_INTERPRET=1)")


def check_float_inputs(**tensors: torch.Tensor) -> None:
    """All tensors share one floating dtype (fp16, bf16 or fp32) and one device, which Triton can
    launch on (check_kernel_device). Int tensors checked against that device need no check of their own."""
    (first_name, first), *rest = tensors.items()
    if first.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{first_name} must be float16, bfloat16 or float32, got {first.dtype}")
    for name, t in rest:
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must match")
    check_kernel_device(**tensors)
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) of q must be a multiple of num_kv_heads ({num_kv_heads}) of k/v"
        )


def check_head_dim(head_dims: dict[str, int]) -> int:
    (first_name, d), *rest = head_dims.items()
    for name, other in rest:
        if other != d:
            raise ValueError(f"head_dim of {name} is {other} but head_dim of {first_name} is {d}; they must match")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    return d


def check_block_size(block_size, name: str = "block_size (dim 1 of the cache)") -> None:
    """Tokens per KV block: a power of two the kernels' page tiles take, up to MAX_BLOCK_SIZE."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")


def check_int_vector(name: str, t: torch.Tensor, length: int, device: torch.device, dtypes=(torch.int32,)) -> torch.Tensor:
    """A 1-D index tensor of `length` entries in one of `dtypes` on `device`, returned contiguous."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != length:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {length}, got {shape}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but must be on {device} with the other inputs")
    return t.contiguous()


def check_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device, total: int | None) -> torch.Tensor:
    """cu_seqlens returned contiguous; the batch is its length - 1. Contents are checked only for
    CPU tensors (no host sync); `total`, when known, is the length of the packed tensor the
    prefix sums index."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.shape[0] < 2:
        shape = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be a 1-D int32 tensor of shape (batch+1,), got {shape}")
    cu = check_int_vector(name, cu, cu.shape[0], device)
    if cu.device.type == "cpu":
        ends_right = total is None or int(cu[-1]) == total
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or not ends_right:
            raise ValueError(f"{name} must be non-decreasing prefix sums from 0 to {total}, got {cu.tolist()}")
    return cu


def check_block_table(block_table: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """An int32 (batch, max_blocks_per_seq) block table on `device`, returned contiguous."""
    check_rank("block_table", block_table, 2, "(batch, max_blocks_per_seq)")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table has {block_table.shape[0]} rows but the batch has {batch} sequences")
    if block_table.dtype != torch.int32:
        raise ValueError(f"block_table must have dtype torch.int32, got {block_table.dtype}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but must be on {device} with the other inputs")
    return block_table.contiguous()


def check_context_lens(context_lens: torch.Tensor, max_context_len: int | None) -> None:
    """On the CPU, where they can be read without a sync: every context is >= 0 and at most
    max_context_len, which sizes the kernel's splits (a longer one would be cut short)."""
    if context_lens.device.type != "cpu" or context_lens.numel() == 0:
        return
    low, high = int(context_lens.min()), int(context_lens.max())
    if low < 0:
        raise ValueError(f"context_lens must be >= 0, got {low}")
    if max_context_len is not None and high > max_context_len:
        raise ValueError(f"context_lens holds a context of {high} tokens but max_context_len is {max_context_len}; "
                         "max_context_len must bound every context")


def check_capacity(name: str, max_len: int | None, lens: torch.Tensor | None, block_table: torch.Tensor,
                   block_size: int, num_blocks: int) -> None:
    """A sequence holds at most max_blocks_per_seq * block_size tokens, and every block its tokens
    live in must be a cache block. `lens` (tokens per sequence) is only read on the CPU."""
    capacity = block_table.shape[1] * block_size
    if max_len is not None and max_len > capacity:
        raise ValueError(f"{name} ({max_len}) exceeds what a block_table row can hold ({capacity} tokens)")
    if lens is None or lens.device.type != "cpu" or lens.numel() == 0:
        return
    if int(lens.max()) > capacity:
        raise ValueError(f"{name}: a context of {int(lens.max())} tokens is more than a block_table row can hold ({capacity})")
    used = torch.arange(block_table.shape[1]) < (lens.long()[:, None] + block_size - 1) // block_size
    ids = block_table[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_table holds block ids outside [0, {num_blocks}) inside a sequence's context")


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    """softmax_scale as a float, head_dim**-0.5 when None; anything but a positive finite real
    number (a string, a bool, a tensor) is refused rather than coerced."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, int | float):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    scale = float(softmax_scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return scale


def check_host_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative Python int, got {value!r}")
    return value


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The caller's output buffer, which must match `like` in shape, dtype and device; or a new one."""
    if out is None:
        return torch.empty_like(like)
    if not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be {like.dtype} {tuple(like.shape)} on {like.device}, got {got}")
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last (head_dim) dimension")
    return out
