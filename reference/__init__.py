"""Plain-PyTorch reference implementations that the Triton kernels are tested against."""

from .attention import attention_ref
from .kv_cache import store_kvcache_ref
from .paged_decode import paged_decode_gather, paged_decode_loop

__all__ = [
    "attention_ref",
    "paged_decode_gather",
    "paged_decode_loop",
    "store_kvcache_ref",
]
