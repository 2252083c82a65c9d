"""Triton kernels for LLM serving: varlen flash prefill, naive one-tile attention, paged decode
(plain, and cascade for a shared prefix) and the KV-cache store, plus the model's fused
elementwise steps (residual add + RMSNorm, q/k norm + rotary embedding, SiLU-and-mul) and
temperature sampling.

Whether they run compiled or in Triton's CPU interpreter is fixed when these modules are
imported: see minivllm.interpreter, which entry points call first.
"""

from minivllm.kernels.cascade_attention import cascade_attention_decode
from minivllm.kernels.flash_attention import flash_attn_varlen
from minivllm.kernels.kv_cache import store_kvcache
from minivllm.kernels.naive_attention import naive_attention
from minivllm.kernels.paged_attention import paged_attention_decode
from minivllm.kernels.qk_norm_rope import qk_norm_rope
from minivllm.kernels.rms_norm import rms_norm
from minivllm.kernels.sampling import sample_tokens
from minivllm.kernels.silu_and_mul import silu_and_mul

__all__ = [
    "cascade_attention_decode", "flash_attn_varlen", "naive_attention", "paged_attention_decode", "qk_norm_rope", "rms_norm", "sample_tokens", "silu_and_mul", "store_kvcache",
]
