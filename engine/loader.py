"""Reading a Hugging Face Qwen3 checkpoint directory: config.json into ModelArgs, and the
safetensors shards (one or many) into the model's fused projections."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import DTYPES
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
    """Copy every safetensors tensor into `model`, splitting q/k/v and gate/up into the fused
    projections. ValueError on a tensor the model has no place for, a shape mismatch, or a
    parameter the checkpoint does not provide."""
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
                    rows = _fused_rows(model.args, fused)
                    dest = dest.narrow(0, sum(rows[:shard]), rows[shard])
                tensor = f.get_tensor(name)
                if dest.shape != tensor.shape:
                    raise ValueError(f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}")
                with torch.no_grad():
                    dest.copy_(tensor)
                unset.discard(target)
    if tied:
        unset.discard("lm_head.weight")
    if unset:
        raise ValueError(f"checkpoint {str(model_dir)!r} lacks {sorted(unset)[:5]}{' …' if len(unset) > 5 else ''}")


def _target(name: str) -> tuple[str, str | None, int]:
    """(model parameter, fused projection or None, shard index) for a checkpoint tensor name."""
    name = name.removeprefix("model.")
    for part, (fused, shard) in FUSED.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), fused, shard
    return name, None, 0


def _fused_rows(args: ModelArgs, fused: str) -> list[int]:
    """Output rows of each shard stacked in a fused projection, in FUSED's shard order."""
    if fused == "qkv_proj":
        return [args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.num_kv_heads * args.head_dim]
    return [args.intermediate_size, args.intermediate_size]
