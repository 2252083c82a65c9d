"""Reading a Hugging Face Qwen3 checkpoint directory: config.json into ModelArgs, and the
safetensors shards (one or many) into the model's fused projections. Under tensor parallelism a
rank reads only its slice of each tensor (safetensors slices), so its memory scales with 1/N."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import DTYPES
from engine.parallel import TPGroup
from engine.qwen3 import ModelArgs, Qwen3ForCausalLM

# Checkpoint projection name -> (fused parameter name, shard index).
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"model must be a checkpoint directory, but {str(path)!r} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "qwen3":
        raise ValueError(f"model {str(path)!r} is a {config.get('model_type')!r} checkpoint; this engine runs model_type 'qwen3'")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights")
    return config


def load_model_args(model_dir: str | Path) -> ModelArgs:
    """ModelArgs from a checkpoint's config.json; ValueError for a directory that is missing, not
    Qwen3, weightless, or asks for a RoPE scaling this engine does not implement."""
    path = Path(model_dir)
    config = _read_config(path)
    # transformers 5 writes rope settings under rope_parameters; older checkpoints at top level.
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"model {str(path)!r} uses rope_type {kind!r}; only the default RoPE is implemented")
    # generation_config.json often lists more stop ids than config.json (Qwen3: <|im_end|> too).
    generation = path / "generation_config.json"
    eos_ids = [_ids(config.get("eos_token_id"))]
    if generation.is_file():
        eos_ids.append(_ids(json.loads(generation.read_text()).get("eos_token_id")))
    heads = config["num_attention_heads"]
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return ModelArgs(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        max_position_embeddings=config.get("max_position_embeddings", 32768),
        torch_dtype=DTYPES.get(dtype, torch.float32),
        eos_token_ids=tuple(dict.fromkeys(i for ids in eos_ids for i in ids)),
    )


def _ids(value) -> list[int]:
    return value if isinstance(value, list) else [] if value is None else [value]


def load_weights(model: Qwen3ForCausalLM, model_dir: str | Path) -> None:
    """Copy every safetensors tensor (this rank's slice of it) into `model`, splitting q/k/v and
    gate/up into the fused projections. ValueError on a tensor the model has no place for, a shape
    mismatch, or a parameter the checkpoint does not provide."""
    params = dict(model.named_parameters())
    unset = set(params)
    tied = model.args.tie_word_embeddings
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if tied and name == "lm_head.weight":
                    continue  # some tied checkpoints still ship the duplicate
                target, fused, shard = _target(name)
                if target not in params:
                    raise ValueError(f"{file.name}: tensor {name!r} has no place in the Qwen3 model")
                dest = params[target]
                if fused:
                    rows = _fused_rows(model, fused)
                    dest = dest.narrow(0, sum(rows[:shard]), rows[shard])
                tensor = _read_slice(f.get_slice(name), name, model.args, model.tp)
                if target in ("embed_tokens.weight", "lm_head.weight"):
                    dest = dest.narrow(0, 0, min(tensor.shape[0], dest.shape[0]))  # the last rank's rows are padded
                if dest.shape != tensor.shape:
                    raise ValueError(f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}")
                with torch.no_grad():
                    dest.copy_(tensor)
                unset.discard(target)
    if tied:
        unset.discard("lm_head.weight")
    if unset:
        raise ValueError(f"checkpoint {str(model_dir)!r} lacks {sorted(unset)[:5]}{' …' if len(unset) > 5 else ''}")


def _read_slice(sl, name: str, args: ModelArgs, tp: TPGroup) -> torch.Tensor:
    """This rank's part of checkpoint tensor `name`: output rows of column-parallel projections
    and of the vocabulary, input columns of row-parallel ones, all of everything else."""
    if tp.size == 1:
        return sl[:]
    d = args.head_dim
    heads = {"q_proj": tp.q_heads, "k_proj": tp.kv_heads, "v_proj": tp.kv_heads, "o_proj": tp.q_heads}
    for part, pick in heads.items():
        if f".{part}." in name:
            r = pick(args.num_heads, args.num_kv_heads)
            rows = slice(r.start * d, r.stop * d)
            return sl[:, rows] if part == "o_proj" else sl[rows]
    for part in ("gate_proj", "up_proj", "down_proj"):
        if f".{part}." in name:
            r = tp.split(args.intermediate_size, "FFN columns (intermediate_size)")
            return sl[:, r.start : r.stop] if part == "down_proj" else sl[r.start : r.stop]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        r = tp.vocab(args.vocab_size)
        return sl[r.start : r.stop]
    return sl[:]


def _target(name: str) -> tuple[str, str | None, int]:
    """(model parameter, fused projection or None, shard index) for a checkpoint tensor name."""
    name = name.removeprefix("model.")
    for part, (fused, shard) in FUSED.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), fused, shard
    return name, None, 0


def _fused_rows(model: Qwen3ForCausalLM, fused: str) -> list[int]:
    """Output rows of each shard stacked in this rank's fused projection, in FUSED's shard order."""
    if fused == "qkv_proj":
        attn = model.layers[0].self_attn
        q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        return [q, kv, kv]
    width = model.layers[0].mlp.down_proj.in_features
    return [width, width]
