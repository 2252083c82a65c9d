"""The engine's configuration: one dataclass that refuses inconsistent settings."""

import os
from dataclasses import dataclass

import torch

from minivllm.dtypes import check_dtype
from minivllm.engine.backend import BACKENDS
from minivllm.interpreter import interpreting
from minivllm.kernels.checks import MAX_BLOCK_SIZE, check_block_size
from minivllm.values import check_bool, check_int, is_int, is_real

DEVICE_TYPES = ("cpu", "cuda")  # the kernels run compiled on CUDA, interpreted on the CPU
# Cache slots (block * block_size + offset) reach the kernels as int32: a cache of more would wrap
# a slot onto another token's.
MAX_CACHE_SLOTS = 2**31


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch.device the engine runs on; ValueError, in the user's terms, for a device that is
    malformed, of a kind the engine does not run on, or not on this machine. None picks cuda when
    available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str | torch.device):
        raise ValueError(f"device must be a str such as 'cpu', 'cuda' or 'cuda:1', a torch.device or None, got {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        # torch's own message lists every backend it knows, most of which the engine cannot use.
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if parsed.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r} is not supported: the engine runs on 'cpu' or 'cuda' ('cuda:N')")
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            visible = f" (cuda:0 to cuda:{count - 1})" if count else ""
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} CUDA devices{visible}")
    return parsed


@dataclass
class Config:
    """Engine settings, each checked for its type and range (ValueError naming the field). `model`
    is a Hugging Face Qwen3 checkpoint directory (a str or os.PathLike, kept as a str).

    kvcache_block_size: tokens per KV block, a power of two in [1, MAX_BLOCK_SIZE]; None means MAX_BLOCK_SIZE on a GPU
        and 16 on the CPU, where the interpreter makes every block visit cost.
    num_kvcache_blocks: -1 sizes the cache from free GPU memory times gpu_memory_utilization, or on
        the CPU from cpu_kvcache_bytes.
    dtype: None keeps the checkpoint's torch_dtype; else "float32", "float16" or "bfloat16" (or
        the torch dtype): the kernels take no other.
    device: None picks cuda when available, else cpu; else "cpu", "cuda" or "cuda:N" of a GPU
        this machine has.
    attention_backend: "triton" (our kernels) or "torch" (the PyTorch references).
    max_model_len: prompt plus output tokens of one request, at most the checkpoint's
        max_position_embeddings; it may exceed max_num_batched_tokens, since prompts are prefilled
        in chunks of at most the step's token budget.
    long_prefill_token_threshold: the most tokens one prompt's chunk takes of a step while other
        requests wait for room (budget left over still goes to it); None means a quarter of
        max_num_batched_tokens.
    async_scheduling: plan and launch each step before the previous step's tokens reach the host
        (they feed the next step on the device), so the GPU does not wait on Python; the tokens are
        those of synchronous scheduling.
    cascade_attention: a decode step whose rows share cached prefix blocks attends over them once
        per tile of rows (minivllm/kernels/cascade_attention.py), when the device's cascade config
        says the batch and the prefix are large enough to gain; the tokens are plain decode's.
    """

    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 256
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    cpu_kvcache_bytes: int = 256 << 20
    kvcache_block_size: int | None = None
    num_kvcache_blocks: int = -1
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    dtype: str | torch.dtype | None = None
    device: str | torch.device | None = None
    attention_backend: str = "triton"
    long_prefill_token_threshold: int | None = None
    async_scheduling: bool = True
    cascade_attention: bool = True

    def __post_init__(self):
        # Every field is checked for its type as well as its range: True would pass for a count of 1,
        # and a str would fail deep inside torch, if at all.
        if not isinstance(self.model, str | os.PathLike):
            raise ValueError(f"model must be a checkpoint directory's path (a str or os.PathLike), got {self.model!r}")
        self.model = str(self.model)
        self.device = check_device(self.device)
        if self.kvcache_block_size is None:
            self.kvcache_block_size = MAX_BLOCK_SIZE if self.device.type == "cuda" else 16
        check_block_size(self.kvcache_block_size, "kvcache_block_size")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "cpu_kvcache_bytes", "tensor_parallel_size"):
            check_int(name, getattr(self, name), 1)
        if self.long_prefill_token_threshold is None:
            self.long_prefill_token_threshold = max(1, self.max_num_batched_tokens // 4)
        check_int("long_prefill_token_threshold", self.long_prefill_token_threshold, 1, " or None")
        check_bool("async_scheduling", self.async_scheduling)
        check_bool("enforce_eager", self.enforce_eager)
        check_bool("cascade_attention", self.cascade_attention)
        if not is_real(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {self.gpu_memory_utilization!r}")
        if not is_int(self.num_kvcache_blocks) or (self.num_kvcache_blocks < 1 and self.num_kvcache_blocks != -1):
            raise ValueError(f"num_kvcache_blocks must be -1 (size from memory) or an int >= 1, got {self.num_kvcache_blocks!r}")
        if self.num_kvcache_blocks * self.kvcache_block_size > MAX_CACHE_SLOTS:
            raise ValueError(f"num_kvcache_blocks ({self.num_kvcache_blocks}) of {self.kvcache_block_size} tokens exceed the {MAX_CACHE_SLOTS} cache slots "
                             "that int32 slot ids address")
        if self.device.type == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs as many GPUs; {torch.cuda.device_count()} are visible")
        if not isinstance(self.attention_backend, str) or self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {sorted(BACKENDS)}, got {self.attention_backend!r}")
        # Refused here, before any kernel meets a dtype it does not take; None keeps the checkpoint's.
        self.dtype = None if self.dtype is None else check_dtype(self.dtype)
        if self.attention_backend == "triton" and self.device.type == "cpu" and not interpreting():
            # Refused here, not at the first kernel launch deep inside generate.
            raise ValueError("attention_backend 'triton' on device 'cpu' needs Triton's interpreter, chosen before the kernels are imported: "
                             "call minivllm.interpret_without_gpu() first or set TRITON_INTERPRET=1, or use attention_backend='torch'")

    def check_cache_holds_one_sequence(self) -> None:
        """Once the cache is sized: a lone sequence of max_model_len tokens must fit, or the scheduler
        could preempt it forever."""
        need = -(-self.max_model_len // self.kvcache_block_size)
        if self.num_kvcache_blocks < need:
            raise ValueError(
                f"num_kvcache_blocks ({self.num_kvcache_blocks}) of {self.kvcache_block_size} tokens cannot hold one "
                f"max_model_len ({self.max_model_len}) sequence, which needs {need}: lower max_model_len or give the cache more memory"
            )
