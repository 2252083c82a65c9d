"""Triton kernels for LLM serving: varlen flash prefill, naive one-tile attention, paged decode
and the KV-cache store, plus the model's fused elementwise steps (residual add + RMSNorm, q/k
norm + rotary embedding, SiLU-and-mul) and temperature sampling.

Without a CUDA device the kernels run in Triton's interpreter. TRITON_INTERPRET must be set
before `triton` is first imported, so it is set here, ahead of every kernel module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.flash_attention import flash_attn_varlen  # noqa: E402
from kernels.kv_cache import store_kvcache  # noqa: E402
from kernels.naive_attention import naive_attention  # noqa: E402
from kernels.paged_attention import paged_attention_decode  # noqa: E402
from kernels.qk_norm_rope import qk_norm_rope  # noqa: E402
from kernels.rms_norm import rms_norm  # noqa: E402
from kernels.sampling import sample_tokens  # noqa: E402
from kernels.silu_and_mul import silu_and_mul  # noqa: E402

__all__ = [
    "flash_attn_varlen", "naive_attention", "paged_attention_decode", "qk_norm_rope", "rms_norm", "sample_tokens", "silu_and_mul", "store_kvcache",
]
