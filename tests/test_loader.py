"""Loading a checkpoint is all or nothing: every tensor config.json implies is loaded once with its
full shape (fused parts and tensor-parallel slices included), on one rank or on each of two;
anything else, and a config.json or shard that cannot be read, is a ValueError naming the tensor,
file and key. A complete checkpoint loads every parameter exactly."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minivllm.engine import LLM, checkpoint_config, loader
from minivllm.engine.backend import TORCH
from minivllm.engine.qwen3 import Qwen3ForCausalLM
from minivllm.engine.tensor_parallel import TPGroup
from minivllm.testing.random_checkpoint import write_random_qwen3

# Rank (0 of 1), and ranks 0 and 1 of 2 built directly: loading needs no process group.
RANKS = [TPGroup(), TPGroup(0, 2), TPGroup(1, 2)]
RANK_IDS = ["tp1", "tp2-rank0", "tp2-rank1"]
VOCAB, HIDDEN = 512, 64
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("untied"), with_tokenizer=False, vocab_size=VOCAB, hidden_size=HIDDEN, seed=5)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return write_random_qwen3(
        tmp_path_factory.mktemp("tied"), with_tokenizer=False, vocab_size=VOCAB, hidden_size=HIDDEN, num_kv_heads=1, tie_word_embeddings=True
    )


@pytest.fixture
def ckpt(untied, tmp_path) -> Path:
    """A copy of the untied checkpoint, for a test to spoil."""
    return Path(shutil.copytree(untied, tmp_path / "ckpt"))


def load(path, tp: TPGroup | None = None) -> Qwen3ForCausalLM:
    """What a rank of LLM(path) loads: ModelArgs from config.json, then the weights."""
    model = Qwen3ForCausalLM(checkpoint_config.load_model_args(path), TORCH, tp)
    loader.load_weights(model, path)
    return model


def edit_tensors(path: Path, edit, file: str = WEIGHTS) -> None:
    """Rewrite one safetensors file after `edit(tensors)` changed its dict in place."""
    tensors = load_file(path / file)
    edit(tensors)
    save_file(tensors, path / file, metadata={"format": "pt"})


def edit_json(path: Path, file: str = "config.json", drop: tuple[str, ...] = (), **changes) -> Path:
    config = json.loads((path / file).read_text())
    config = {k: v for k, v in config.items() if k not in drop} | changes
    (path / file).write_text(json.dumps(config))
    return path / file


def names_in(path: Path) -> set[str]:
    with safe_open(str(path / WEIGHTS), "pt") as f:
        return set(f.keys())


# --- complete checkpoints load -----------------------------------------------------------


def test_every_parameter_is_loaded_from_its_tensor(untied):
    model = load(untied)
    full = load_file(untied / WEIGHTS)
    params = dict(model.named_parameters())
    for i in range(model.args.num_layers):
        q, k, v = full[f"model.layers.{i}.self_attn.q_proj.weight"], full[f"model.layers.{i}.self_attn.k_proj.weight"], full[f"model.layers.{i}.self_attn.v_proj.weight"]
        assert torch.equal(params[f"layers.{i}.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        gate, up = full[f"model.layers.{i}.mlp.gate_proj.weight"], full[f"model.layers.{i}.mlp.up_proj.weight"]
        assert torch.equal(params[f"layers.{i}.mlp.gate_up_proj.weight"], torch.cat([gate, up]))
    unfused = {name.removeprefix("model."): t for name, t in full.items() if not any(f".{p}." in name for p in loader.FUSED)}
    assert len(unfused) + 2 * model.args.num_layers == len(params)  # with qkv and gate_up: every parameter
    for name, t in unfused.items():
        assert torch.equal(params[name], t), name


def test_tied_lm_head_shipped_anyway_is_checked_then_ignored(tied, tmp_path):
    """As in transformers, a tied model's output projection is embed_tokens, whatever copy the
    checkpoint carries; the copy must still have config.json's shape."""
    assert "lm_head.weight" not in names_in(tied)
    plain = load(tied)
    assert plain.lm_head.weight is plain.embed_tokens.weight
    shipped = Path(shutil.copytree(tied, tmp_path / "shipped"))
    edit_tensors(shipped, lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, HIDDEN)}))
    model = load(shipped)
    assert torch.equal(model.lm_head.weight, plain.embed_tokens.weight)
    edit_tensors(shipped, lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB - 12, HIDDEN)}))
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(500, 64\).*implies \(512, 64\)"):
        load(shipped)


def test_rotary_inv_freq_of_older_checkpoints_is_skipped(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    assert torch.equal(load(ckpt).norm.weight, load_file(ckpt / WEIGHTS)["model.norm.weight"])


def test_attention_biases_are_loaded_into_the_fused_projection(ckpt):
    """attention_bias true: each q/k/v bias fills its rows of qkv_proj's bias, and one left out is named."""
    edit_json(ckpt, attention_bias=True)
    full = load_file(ckpt / WEIGHTS)
    biases = {
        f"model.layers.{i}.self_attn.{p}_proj.bias": torch.randn(full[f"model.layers.{i}.self_attn.{p}_proj.weight"].shape[0])
        for i in range(2)
        for p in "qkvo"
    }
    edit_tensors(ckpt, lambda t: t.update(biases))
    attn = load(ckpt).layers[1].self_attn
    assert torch.equal(attn.qkv_proj.bias, torch.cat([biases[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]))
    assert torch.equal(attn.o_proj.bias, biases["model.layers.1.self_attn.o_proj.bias"])
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.v_proj.bias"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*'model.layers.1.self_attn.v_proj.bias'"):
        load(ckpt)


# --- case 1: a checkpoint missing or misshaping a tensor ---------------------------------------


@pytest.mark.parametrize("tp", RANKS, ids=RANK_IDS)
@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",  # one part of qkv_proj
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.0.mlp.up_proj.weight",  # one half of gate_up_proj
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.self_attn.k_norm.weight",
        "lm_head.weight",
    ],
)
def test_a_missing_tensor_is_named(ckpt, name, tp):
    edit_tensors(ckpt, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"{re.escape(str(ckpt))}.*lacks 1 tensor\(s\).*{re.escape(repr(name))}"):
        load(ckpt, tp)


def test_a_missing_untied_lm_head_hints_at_tying(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="tie_word_embeddings: true"):
        load(ckpt)


def test_a_missing_shard_lists_what_it_held(ckpt):
    edit_tensors(ckpt, lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.1.")])
    with pytest.raises(ValueError, match=r"lacks 11 tensor\(s\).*'model.layers.1.input_layernorm.weight'.* and 3 more"):
        load(ckpt)


@pytest.mark.parametrize("tp", RANKS, ids=RANK_IDS)
@pytest.mark.parametrize(
    "name, shape, want",
    [
        ("model.embed_tokens.weight", (500, HIDDEN), (VOCAB, HIDDEN)),  # each rank's slice would fit
        ("lm_head.weight", (VOCAB + 64, HIDDEN), (VOCAB, HIDDEN)),
        ("model.layers.0.mlp.up_proj.weight", (130, HIDDEN), (128, HIDDEN)),  # rank 0's 64 rows would fit
        ("model.layers.0.self_attn.k_proj.weight", (96, HIDDEN), (64, HIDDEN)),
        ("model.layers.1.mlp.down_proj.weight", (HIDDEN, 256), (HIDDEN, 128)),
        ("model.layers.0.self_attn.q_norm.weight", (1, 32), (32,)),
    ],
)
def test_a_tensor_of_another_shape_is_named_with_both_shapes(ckpt, name, shape, want, tp):
    edit_tensors(ckpt, lambda t: t.update({name: torch.zeros(shape)}))
    match = rf"{re.escape(str(ckpt / WEIGHTS))}: tensor {re.escape(repr(name))} has shape {re.escape(str(shape))}, but .*config.json implies {re.escape(str(want))}"
    with pytest.raises(ValueError, match=match):
        load(ckpt, tp)


def test_a_tensor_in_two_shards_is_refused(ckpt):
    full = load_file(ckpt / WEIGHTS)
    (ckpt / WEIGHTS).unlink()
    names = sorted(full)
    first, second = names[: len(names) // 2], names[len(names) // 2 - 1 :]  # one tensor in both
    save_file({n: full[n] for n in first}, ckpt / "model-00001-of-00002.safetensors")
    save_file({n: full[n] for n in second}, ckpt / "model-00002-of-00002.safetensors")
    twice = names[len(names) // 2 - 1]
    with pytest.raises(ValueError, match=rf"{re.escape(repr(twice))} appears twice, in .*model-00001-of-00002.safetensors and in .*model-00002"):
        load(ckpt)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.2.mlp.up_proj.weight", (128, HIDDEN)),  # a layer beyond num_hidden_layers
        ("model.layers.0.self_attn.q_proj.bias", (128,)),  # attention_bias is false
        ("model.layers.0.mlp.up_proj.weight_scale_inv", (1, 1)),  # a quantized checkpoint's scale
    ],
)
def test_an_unexpected_tensor_is_named(ckpt, name, shape):
    edit_tensors(ckpt, lambda t: t.update({name: torch.zeros(shape)}))
    with pytest.raises(ValueError, match=rf"has no place for: {re.escape(repr(name))} \(in {WEIGHTS}\)"):
        load(ckpt)


def test_llm_refuses_a_checkpoint_missing_half_a_fused_projection(ckpt):
    """The issue's reproduction: LLM(dir) used to load this and generate from random rows."""
    edit_tensors(ckpt, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight'"):
        LLM(str(ckpt), max_model_len=32, max_num_batched_tokens=64, device="cpu", attention_backend="torch")


# --- case 6: config.json and shards that cannot be read ----------------------------------------


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"])
def test_a_missing_config_key_is_named(ckpt, key):
    file = edit_json(ckpt, drop=(key,))
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))} lacks '{key}'"):
        checkpoint_config.load_model_args(ckpt)


@pytest.mark.parametrize(
    "key, value",
    [
        ("vocab_size", "512"),
        ("vocab_size", 512.0),
        ("hidden_size", None),
        ("intermediate_size", -128),
        ("num_hidden_layers", 0),  # was an IndexError
        ("num_hidden_layers", True),
        ("num_attention_heads", 0),  # was a ZeroDivisionError
        ("num_key_value_heads", 0),
        ("num_key_value_heads", 3),  # does not divide the 4 heads
        ("head_dim", -32),
        ("head_dim", 33),  # RoPE rotates pairs
        ("max_position_embeddings", 0),
        ("rms_norm_eps", 0),
        ("rms_norm_eps", "1e-6"),
        ("rms_norm_eps", float("nan")),
        ("rope_theta", -1.0),
        ("rope_parameters", "default"),
        ("tie_word_embeddings", "false"),
        ("attention_bias", 0),
        ("eos_token_id", "<|endoftext|>"),
        ("eos_token_id", [1, None]),
        ("dtype", 16),
        ("hidden_act", "gelu"),
        ("use_sliding_window", True),
        ("quantization_config", {"quant_method": "fp8"}),
    ],
)
def test_a_config_value_of_the_wrong_type_or_range_is_named(ckpt, key, value):
    if key == "rope_theta":  # transformers 5 writes it under rope_parameters
        file = edit_json(ckpt, rope_parameters={"rope_type": "default", "rope_theta": value})
    else:
        file = edit_json(ckpt, **{key: value})
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}.*{key}"):
        checkpoint_config.load_model_args(ckpt)


def test_head_dim_from_indivisible_hidden_size_is_refused(ckpt):
    file = edit_json(ckpt, drop=("head_dim",), num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))} has no 'head_dim', and 'hidden_size' \(64\)"):
        checkpoint_config.load_model_args(ckpt)


def test_optional_config_keys_take_transformers_defaults(ckpt):
    edit_json(ckpt, drop=("num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "dtype"))
    args = checkpoint_config.load_model_args(ckpt)
    assert (args.num_kv_heads, args.rms_norm_eps, args.max_position_embeddings) == (4, 1e-6, 32768)
    assert (args.tie_word_embeddings, args.attention_bias, args.torch_dtype) == (False, False, torch.float32)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
@pytest.mark.parametrize("text", ['{"vocab_size": 512,', "[1, 2]", "\xff\xfe"])
def test_unparseable_json_names_its_file(ckpt, name, text):
    (ckpt / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(ckpt / name))):
        checkpoint_config.load_model_args(ckpt)


def test_bad_generation_config_eos_is_named(ckpt):
    file = edit_json(ckpt, "generation_config.json", eos_token_id=[1, -2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: 'eos_token_id'"):
        checkpoint_config.load_model_args(ckpt)


@pytest.mark.parametrize("keep", [0.5, 100, 4])
def test_a_truncated_shard_is_named(ckpt, keep):
    """Cut within the data, within the header, and within the header's length field."""
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=rf"{re.escape(str(ckpt / WEIGHTS))} is not a readable safetensors file"):
        load(ckpt)
