"""store_kvcache against the reference store, on caches poisoned with NaN."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from minivllm.kernels import store_kvcache
from minivllm.reference import store_kvcache_ref
from minivllm.reference.inputs import as_layout, generator, randn
from tests.cases import BLOCK_SIZES, DTYPES, HEAD_DIMS, LAYOUTS


@st.composite
def store_cases(draw):
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    num_blocks = draw(st.integers(1, 6))
    num_slots = num_blocks * block_size
    num_tokens = draw(st.integers(0, min(num_slots, 40)))
    # Distinct slots, some tokens padded with -1.
    slots = draw(st.lists(st.integers(0, num_slots - 1), min_size=num_tokens, max_size=num_tokens, unique=True))
    slots = [s if draw(st.integers(0, 4)) else -1 for s in slots]
    return dict(block_size=block_size, num_blocks=num_blocks, slots=slots,
                num_kv_heads=draw(st.sampled_from([1, 2, 3, 8])), head_dim=draw(st.sampled_from(HEAD_DIMS)),
                dtype=draw(st.sampled_from(DTYPES)), slot_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                seed=draw(st.integers(0, 2**31 - 1)), layout=draw(LAYOUTS))


@given(case=store_cases())
def test_store_matches_reference(case, device):
    gen = generator(case["seed"], device)
    n, h, d, dtype = len(case["slots"]), case["num_kv_heads"], case["head_dim"], case["dtype"]
    # key/value as views into a fused qkv buffer, as the model produces them.
    qkv = randn((n, 3 * h, d), dtype, device, gen)
    key, value = qkv[:, h : 2 * h], qkv[:, 2 * h :]
    cache_shape = (case["num_blocks"], case["block_size"], h, d)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = as_layout(torch.tensor(case["slots"], dtype=case["slot_dtype"], device=device), case["layout"])
    store_kvcache(key, value, k_cache, v_cache, slots)
    store_kvcache_ref(key, value, k_ref, v_ref, slots)
    # equal_nan: untouched slots must still hold the poison; written ones must be bit-exact.
    assert torch.equal(k_cache.isnan(), k_ref.isnan()) and torch.equal(v_cache.isnan(), v_ref.isnan())
    assert torch.equal(k_cache.nan_to_num(0), k_ref.nan_to_num(0))
    assert torch.equal(v_cache.nan_to_num(0), v_ref.nan_to_num(0))
