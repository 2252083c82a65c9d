"""Plain-PyTorch reference implementations that the Triton kernels are tested against.

Beside them, the harness the tests and the benchmarks share, with no test dependency:
reference.inputs builds the inputs, reference.tolerance holds the accuracy rule, and
reference.prefill_check and reference.decode_check are the benchmarks' (and the tuner's) gates."""

from .activation import silu_and_mul_ref
from .attention import attention_ref
from .kv_cache import store_kvcache_ref
from .paged_decode import paged_decode_gather, paged_decode_loop
from .rms_norm import rms_norm_ref
from .rotary import apply_rope_ref, qk_norm_rope_ref, rope_cos_sin
from .sampling import filter_probs_ref, sample_ref

__all__ = [
    "apply_rope_ref",
    "attention_ref",
    "filter_probs_ref",
    "paged_decode_gather",
    "paged_decode_loop",
    "qk_norm_rope_ref",
    "rms_norm_ref",
    "rope_cos_sin",
    "sample_ref",
    "silu_and_mul_ref",
    "store_kvcache_ref",
]
