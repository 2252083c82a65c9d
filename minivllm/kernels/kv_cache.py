"""Scatter new keys and values into the paged KV cache."""

import torch
import triton
import triton.language as tl

from minivllm.kernels.checks import check_block_size, check_float_inputs, check_int_vector, check_rank, check_same_shape
from minivllm.kernels.launch import head_dim_block


@triton.jit
def _store_kv(
    KEY, VALUE, K_CACHE, V_CACHE, SLOTS, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + token).to(tl.int64)
    # -1 marks a token with no slot (padding); out-of-range slots are skipped, never written.
    if (slot >= 0) & (slot < num_slots):
        blk = slot // PAGE
        pos = slot % PAGE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        hd = offs_h[:, None]
        key = tl.load(KEY + token * stride_kt + hd * stride_kh + offs_d[None, :], mask=mask)
        value = tl.load(VALUE + token * stride_vt + hd * stride_vh + offs_d[None, :], mask=mask)
        tl.store(K_CACHE + blk * stride_kcb + pos * stride_kct + hd * stride_kch + offs_d[None, :], key, mask=mask)
        tl.store(V_CACHE + blk * stride_vcb + pos * stride_vct + hd * stride_vch + offs_d[None, :], value, mask=mask)


def check_kv_store(key, value, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """ValueError for arguments store_kvcache's contract refuses; returns slot_mapping as the
    kernels read it (contiguous). Shared by every kernel that writes the cache."""
    check_rank("key", key, 3, "(num_tokens, num_kv_heads, head_dim)")
    check_rank("value", value, 3, "(num_tokens, num_kv_heads, head_dim)")
    layout = "(num_blocks, block_size, num_kv_heads, head_dim)"
    check_rank("k_cache", k_cache, 4, layout)
    check_rank("v_cache", v_cache, 4, layout)
    check_same_shape("key", key, "value", value)
    check_same_shape("k_cache", k_cache, "v_cache", v_cache)
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key is (num_tokens, num_kv_heads, head_dim) = {tuple(key.shape)} but the cache holds "
            f"(num_kv_heads, head_dim) = {tuple(k_cache.shape[2:])}; they must match"
        )
    check_float_inputs(key=key, value=value, k_cache=k_cache, v_cache=v_cache)
    check_block_size(k_cache.shape[1])
    num_tokens = key.shape[0]
    slot_mapping = check_int_vector("slot_mapping", slot_mapping, num_tokens, key.device, (torch.int32, torch.int64))
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.device.type == "cpu" and num_tokens and (
        int(slot_mapping.min()) < -1 or int(slot_mapping.max()) >= num_slots
    ):
        raise ValueError(f"slot_mapping must hold -1 or slots in [0, {num_slots}), got range "
                         f"[{int(slot_mapping.min())}, {int(slot_mapping.max())}]")
    return slot_mapping


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key and value into its cache slot, in place.

    key, value: (num_tokens, num_kv_heads, head_dim), fp16/bf16/fp32, last dim contiguous (views
        into a fused qkv projection are fine).
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim), same dtype.
    slot_mapping: int32 or int64 (num_tokens,); slot = block_id * block_size + offset, -1 skips
        the token. Slots are only range-checked on the host for CPU tensors; on a GPU a slot
        outside the cache is skipped rather than written out of bounds.
    """
    slot_mapping = check_kv_store(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_slots = key.shape[0], k_cache.shape[0] * k_cache.shape[1]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    _store_kv[(num_tokens,)](
        KEY=key, VALUE=value, K_CACHE=k_cache, V_CACHE=v_cache, SLOTS=slot_mapping, num_slots=num_slots,
        stride_kt=key.stride(0), stride_kh=key.stride(1), stride_vt=value.stride(0), stride_vh=value.stride(1),
        stride_kcb=k_cache.stride(0), stride_kct=k_cache.stride(1), stride_kch=k_cache.stride(2),
        stride_vcb=v_cache.stride(0), stride_vct=v_cache.stride(1), stride_vch=v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=head_dim_block(head_dim), PAGE=k_cache.shape[1],
    )
