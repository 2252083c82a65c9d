"""MinivLLM: Triton attention kernels for LLM serving, the PyTorch references that check them,
and a small vLLM-style engine that runs them end to end.

    minivllm.kernels     Triton kernels and their wrappers, per-GPU tuning tables in configs/
    minivllm.reference   independent PyTorch implementations of the same contracts
    minivllm.engine      LLM, SamplingParams: scheduler, KV block manager, Qwen3
    minivllm.testing     seeded random-weight checkpoints in real models' shapes

The names below are loaded on first use, so `import minivllm` imports neither torch nor triton.
On a machine without a GPU, call `minivllm.interpret_without_gpu()` before using a kernel.
"""

import importlib

from minivllm.interpreter import interpret_without_gpu, interpreting

# public name -> the module that defines it
_LAZY = {
    "LLM": "minivllm.engine.llm",
    "SamplingParams": "minivllm.engine.sampling_params",
    "flash_attn_varlen": "minivllm.kernels.flash_attention",
    "naive_attention": "minivllm.kernels.naive_attention",
    "paged_attention_decode": "minivllm.kernels.paged_attention",
    "store_kvcache": "minivllm.kernels.kv_cache",
}

__all__ = [*_LAZY, "interpret_without_gpu", "interpreting"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")
