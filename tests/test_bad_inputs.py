"""Every malformed call raises ValueError naming the argument at fault, before any launch."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import triton

from minivllm import kernels
from minivllm.kernels import (
    cascade_attention_decode,
    checks,
    flash_attn_varlen,
    naive_attention,
    paged_attention_decode,
    qk_norm_rope,
    rms_norm,
    sample_tokens,
    silu_and_mul,
    store_kvcache,
)
from minivllm.reference.inputs import as_layout, cu_seqlens, generator, paged_cache, randn, share_prefix

F16 = torch.float16


def flash_args(device, paged=False):
    gen = generator(0, device)
    q = randn((10, 4, 32), F16, device, gen)
    if paged:
        cache = paged_cache((7, 12), 4, 2, 32, F16, device, gen)
        k, v, table = cache.k_cache, cache.v_cache, cache.block_table
        k_lens = (7, 12)
    else:
        k, v, table = randn((19, 2, 32), F16, device, gen), randn((19, 2, 32), F16, device, gen), None
        k_lens = (7, 12)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens((4, 6), device), cu_seqlens_k=cu_seqlens(k_lens, device),
                max_seqlen_q=6, max_seqlen_k=12, block_table=table)


def naive_args(device):
    gen = generator(0, device)
    return dict(q=randn((10, 4, 32), F16, device, gen), k=randn((10, 2, 32), F16, device, gen),
                v=randn((10, 2, 32), F16, device, gen), cu_seqlens=cu_seqlens((4, 6), device), max_seqlen=6)


def decode_args(device):
    gen = generator(0, device)
    cache = paged_cache((7, 12), 4, 2, 32, F16, device, gen)
    return dict(q=randn((2, 4, 32), F16, device, gen), k_cache=cache.k_cache, v_cache=cache.v_cache,
                block_table=cache.block_table, context_lens=torch.tensor([7, 12], dtype=torch.int32, device=device))


def cascade_args(device):
    """decode_args' shapes, both rows sharing their first block."""
    gen = generator(0, device)
    cache = share_prefix(paged_cache((7, 12), 4, 2, 32, F16, device, gen), (7, 12), 1)
    return dict(q=randn((2, 4, 32), F16, device, gen), k_cache=cache.k_cache, v_cache=cache.v_cache, block_table=cache.block_table,
                context_lens=torch.tensor([7, 12], dtype=torch.int32, device=device), shared_len=torch.tensor([4], dtype=torch.int32, device=device))


def store_args(device):
    gen = generator(0, device)
    cache = paged_cache((8,), 4, 2, 32, F16, device, gen)
    return dict(key=randn((3, 2, 32), F16, device, gen), value=randn((3, 2, 32), F16, device, gen),
                k_cache=cache.k_cache, v_cache=cache.v_cache,
                slot_mapping=torch.tensor([0, -1, 5], dtype=torch.int32, device=device))


def norm_rope_args(device):
    gen = generator(0, device)
    return dict(q=randn((3, 4, 16), F16, device, gen), k=randn((3, 2, 16), F16, device, gen),
                q_weight=randn((16,), F16, device, gen), k_weight=randn((16,), F16, device, gen),
                cos=randn((3, 16), F16, device, gen), sin=randn((3, 16), F16, device, gen), eps=1e-6)


def rms_args(device):
    gen = generator(0, device)
    return dict(x=randn((3, 32), F16, device, gen), weight=randn((32,), F16, device, gen), eps=1e-6,
                residual=randn((3, 32), F16, device, gen))


def sample_args(device):
    return dict(logits=randn((2, 16), torch.float32, device, generator(0, device)),
                temperatures=torch.ones(2, device=device), seed=0)


def silu_args(device):
    return dict(x=randn((3, 32), F16, device, generator(0, device)))


@dataclass(frozen=True)
class Call:
    """A public kernel with the builder of a valid set of its arguments: call(device, **bad) runs
    it on those arguments with `bad` replacing some."""

    name: str
    kernel: Callable
    args: Callable

    def __call__(self, device, **bad):
        return self.kernel(**{**self.args(device), **bad})


flash = Call("flash", flash_attn_varlen, flash_args)
flash_paged = Call("flash_paged", flash_attn_varlen, lambda device: flash_args(device, paged=True))
naive = Call("naive", naive_attention, naive_args)
decode = Call("decode", paged_attention_decode, decode_args)
cascade = Call("cascade", cascade_attention_decode, cascade_args)
store = Call("store", store_kvcache, store_args)
norm_rope = Call("norm_rope", qk_norm_rope, norm_rope_args)
rms = Call("rms", rms_norm, rms_args)
sample = Call("sample", sample_tokens, sample_args)
silu = Call("silu", silu_and_mul, silu_args)
CALLS = (flash, flash_paged, naive, decode, cascade, store, norm_rope, rms, sample, silu)


def half(t):
    return t[..., :16]


def meta(t):
    return torch.empty_like(t, device="meta")


BAD_CALLS = {
    # mismatched head_dim
    "flash k head_dim": (flash, lambda a: dict(k=half(a["k"]), v=half(a["v"])), "head_dim of k"),
    "naive v head_dim": (naive, lambda a: dict(v=half(a["v"])), "head_dim"),
    "decode k_cache head_dim": (decode, lambda a: dict(k_cache=half(a["k_cache"]), v_cache=half(a["v_cache"])), "head_dim"),
    "store key head_dim": (store, lambda a: dict(key=half(a["key"]), value=half(a["value"])), "head_dim"),
    "head_dim too large": (naive, lambda a: dict(q=a["q"].repeat(1, 1, 9), k=a["k"].repeat(1, 1, 9), v=a["v"].repeat(1, 1, 9)), "head_dim"),
    # heads not divisible
    "flash heads": (flash, lambda a: dict(q=a["q"][:, :3]), "num_kv_heads"),
    "naive heads": (naive, lambda a: dict(q=a["q"][:, :3]), "num_kv_heads"),
    "decode heads": (decode, lambda a: dict(q=a["q"][:, :3]), "num_kv_heads"),
    "store heads": (store, lambda a: dict(key=a["key"][:, :1], value=a["value"][:, :1]), "num_kv_heads"),
    # wrong ranks
    "flash q rank": (flash, lambda a: dict(q=a["q"][0]), "q must be 3-D"),
    "flash paged k rank": (flash_paged, lambda a: dict(k=a["k"][0], v=a["v"][0]), "k must be 4-D"),
    "naive k rank": (naive, lambda a: dict(k=a["k"][None]), "k must be 3-D"),
    "decode q rank": (decode, lambda a: dict(q=a["q"][None]), "q must be 3-D"),
    "decode cache rank": (decode, lambda a: dict(k_cache=a["k_cache"][0]), "k_cache must be 4-D"),
    "decode block_table rank": (decode, lambda a: dict(block_table=a["block_table"][0]), "block_table must be 2-D"),
    "store key rank": (store, lambda a: dict(key=a["key"][0]), "key must be 3-D"),
    # dtypes or devices that differ
    "flash k dtype": (flash, lambda a: dict(k=a["k"].float()), "k has dtype"),
    "flash int q": (flash, lambda a: dict(q=a["q"].to(torch.int32)), "q must be float16"),
    "naive v device": (naive, lambda a: dict(v=meta(a["v"])), "v is on"),
    "decode v_cache dtype": (decode, lambda a: dict(v_cache=a["v_cache"].to(torch.bfloat16)), "v_cache has dtype"),
    "decode q device": (decode, lambda a: dict(k_cache=meta(a["k_cache"]), v_cache=meta(a["v_cache"])), "k_cache is on"),
    "decode context_lens device": (decode, lambda a: dict(context_lens=meta(a["context_lens"])), "context_lens is on"),
    "store cache dtype": (store, lambda a: dict(k_cache=a["k_cache"].float(), v_cache=a["v_cache"].float()), "k_cache has dtype"),
    "store slot_mapping device": (store, lambda a: dict(slot_mapping=meta(a["slot_mapping"])), "slot_mapping is on"),
    "flash out dtype": (flash, lambda a: dict(out=torch.empty_like(a["q"], dtype=torch.float32)), "out must be"),
    # block_table rows != batch
    "flash block_table rows": (flash_paged, lambda a: dict(block_table=a["block_table"][:1]), "block_table has 1 rows"),
    "decode block_table rows": (decode, lambda a: dict(block_table=a["block_table"].repeat(2, 1)), "block_table has 4 rows"),
    "decode block_table dtype": (decode, lambda a: dict(block_table=a["block_table"].long()), "block_table must have dtype"),
    # contexts longer than a block-table row holds
    "flash max_seqlen_k over capacity": (flash_paged, lambda a: dict(max_seqlen_k=a["block_table"].shape[1] * 4 + 1), "max_seqlen_k"),
    "decode max_context_len over capacity": (decode, lambda a: dict(max_context_len=a["block_table"].shape[1] * 4 + 1), "context_lens"),
    "decode context over capacity": (decode, lambda a: dict(block_table=a["block_table"][:, :2]), "context_lens"),
    # cu_seqlens of the wrong dtype or shape
    "flash cu_seqlens_q dtype": (flash, lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()), "cu_seqlens_q must have dtype"),
    "flash cu_seqlens_k shape": (flash, lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][None]), "cu_seqlens_k must be a 1-D"),
    "flash cu_seqlens_k batch": (flash, lambda a: dict(cu_seqlens_k=cu_seqlens((7, 6, 6), a["q"].device)), "cu_seqlens_k"),
    "naive cu_seqlens dtype": (naive, lambda a: dict(cu_seqlens=a["cu_seqlens"].float()), "cu_seqlens must have dtype"),
    "naive cu_seqlens shape": (naive, lambda a: dict(cu_seqlens=a["cu_seqlens"][:1]), "cu_seqlens must be a 1-D"),
    "decode context_lens dtype": (decode, lambda a: dict(context_lens=a["context_lens"].long()), "context_lens must have dtype"),
    "decode context_lens shape": (decode, lambda a: dict(context_lens=a["context_lens"][:1]), "context_lens must be a 1-D"),
    "store slot_mapping shape": (store, lambda a: dict(slot_mapping=a["slot_mapping"][:2]), "slot_mapping must be a 1-D"),
    # other arguments
    "flash max_seqlen not int": (flash, lambda a: dict(max_seqlen_q=torch.tensor(6)), "max_seqlen_q"),
    "flash negative scale": (flash, lambda a: dict(softmax_scale=-1.0), "softmax_scale"),
    "decode block_size not power of two": (decode, lambda a: dict(k_cache=a["k_cache"][:, :3], v_cache=a["v_cache"][:, :3]), "block_size"),
    "decode num_splits zero": (decode, lambda a: dict(num_splits=0), "num_splits"),
    "decode num_splits past the merge's tile": (decode, lambda a: dict(num_splits=129), r"num_splits must be in \[1, 128\]"),
    # flags and scales that Python would coerce
    "flash causal string": (flash, lambda a: dict(causal="no"), "causal must be a bool"),
    "naive causal int": (naive, lambda a: dict(causal=1), "causal must be a bool"),
    "flash scale string": (flash, lambda a: dict(softmax_scale="abc"), "softmax_scale must be a positive finite number"),
    "decode scale bool": (decode, lambda a: dict(softmax_scale=True), "softmax_scale must be a positive finite number"),
    # context lengths the host can read: negative, or past the max_context_len that sizes splits
    "decode negative context": (decode, lambda a: dict(context_lens=torch.tensor([-1, 12], dtype=torch.int32, device=a["q"].device)), "context_lens must be >= 0"),
    "decode max_context_len below contexts": (decode, lambda a: dict(max_context_len=4), "max_context_len is 4"),
    # cascade: the shared length and its bound
    "cascade shared_len dtype": (cascade, lambda a: dict(shared_len=a["shared_len"].long()), "shared_len must have dtype"),
    "cascade shared_len shape": (cascade, lambda a: dict(shared_len=a["shared_len"].repeat(2)), "shared_len must be a 1-D"),
    "cascade shared_len device": (cascade, lambda a: dict(shared_len=meta(a["shared_len"])), "shared_len is on"),
    "cascade max_shared_len over max context": (cascade, lambda a: dict(max_shared_len=99), "max_shared_len must be in"),
    "cascade max_shared_len not int": (cascade, lambda a: dict(max_shared_len=4.0), "max_shared_len"),
    "cascade shared_len off a block edge": (cascade, lambda a: dict(shared_len=a["shared_len"] + 1), "shared_len must be a multiple of the block size"),
    "cascade row 0 shorter than the prefix": (cascade, lambda a: dict(shared_len=a["shared_len"] + 4), "row 0 holds the shared prefix"),
}

# Caught by reading tensor contents, which the wrappers only do for CPU tensors.
READS_DEVICE_DATA = {"decode context over capacity", "decode negative context", "decode max_context_len below contexts",
                     "cascade shared_len off a block edge", "cascade row 0 shorter than the prefix"}

# Every public kernel, called validly but with host tensors, and the argument its error names.
HOST_TENSOR_CALLS = {
    "flash_attn_varlen": (flash, "q"),
    "naive_attention": (naive, "q"),
    "paged_attention_decode": (decode, "q"),
    "cascade_attention_decode": (cascade, "q"),
    "qk_norm_rope": (norm_rope, "q"),
    "rms_norm": (rms, "x"),
    "sample_tokens": (sample, "logits"),
    "silu_and_mul": (silu, "x"),
    "store_kvcache": (store, "key"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_raises_value_error(name, device):
    call, mutate, message = BAD_CALLS[name]
    if name in READS_DEVICE_DATA and device.type != "cpu":
        pytest.skip("the host cannot see device contents without a sync; test_paged_attention checks the NaN instead")
    with pytest.raises(ValueError, match=message):
        call(device, **mutate(call.args(device)))


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.name)
def test_valid_baseline_calls_pass(call, device):
    """The unmutated arguments are valid, so each failure above is due to its one mutation."""
    call(device)


def test_host_tensor_calls_cover_every_public_kernel():
    assert sorted(HOST_TENSOR_CALLS) == sorted(kernels.__all__)


def refuse_launch(kernel, grid):
    raise AssertionError(f"{kernel} was launched; the device check must come first")


@pytest.mark.parametrize("name", HOST_TENSOR_CALLS)
def test_host_tensors_are_refused_where_triton_compiles_for_a_gpu(name, monkeypatch):
    """Where Triton compiles for a GPU (played here by turning the interpreter off for the checks),
    CPU tensors raise ValueError naming the argument, not Triton's 'cpu tensor?' error, and no
    kernel is launched. The arguments are otherwise valid (test_valid_baseline_calls_pass)."""
    call, arg = HOST_TENSOR_CALLS[name]
    monkeypatch.setattr(checks, "interpreting", lambda: False)
    monkeypatch.setattr(triton.KernelInterface, "__getitem__", refuse_launch)
    with pytest.raises(ValueError, match=rf"^{arg} is on cpu but Triton compiles for cuda"):
        call(torch.device("cpu"))


def strided(t):
    """t as a view whose elements (1-D) or rows' columns (2-D) are not adjacent in memory."""
    return as_layout(t, "padded" if t.dim() == 1 else "transposed")


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_strided_cu_seqlens_read_as_their_values(name, device):
    """A strided view (t[:, 0] of a 2-D tensor) once aborted the process or misread the offsets."""
    args = flash_args(device)
    expected = flash_attn_varlen(**args)
    assert torch.equal(flash_attn_varlen(**{**args, name: strided(args[name])}), expected)
    n_args = naive_args(device)
    assert torch.equal(naive_attention(**{**n_args, "cu_seqlens": strided(n_args["cu_seqlens"])}), naive_attention(**n_args))


@pytest.mark.parametrize("name", ["block_table", "context_lens"])
def test_strided_decode_index_tensors_read_as_their_values(name, device):
    """A transposed block table or strided context lengths once gave decode errors near 1."""
    args = decode_args(device)
    assert not strided(args[name]).is_contiguous()
    assert torch.equal(paged_attention_decode(**{**args, name: strided(args[name])}), paged_attention_decode(**args))


def test_transposed_block_table_in_paged_prefill(device):
    args = flash_args(device, paged=True)
    assert torch.equal(flash_attn_varlen(**{**args, "block_table": strided(args["block_table"])}), flash_attn_varlen(**args))


def test_strided_slot_mapping_writes_the_slots_it_holds(device):
    """A strided slot_mapping once wrote slot 100 where it held slot 2."""
    dense, view = store_args(device), store_args(device)
    store_kvcache(**dense)
    store_kvcache(**{**view, "slot_mapping": strided(view["slot_mapping"])})
    assert torch.equal(dense["k_cache"].nan_to_num(0), view["k_cache"].nan_to_num(0))
    assert torch.equal(dense["k_cache"].isnan(), view["k_cache"].isnan())
