"""A Hugging Face Qwen3 checkpoint's config.json (and generation_config.json) read into ModelArgs.

Every field is checked for presence, type and range, and every error names the file and the
key: a bool where an int is meant, a string "false" for a flag, zero heads or a head count the
kv heads do not divide would otherwise surface later as a TypeError, a ZeroDivisionError or
wrong output.
"""

from pathlib import Path

import torch

from minivllm.dtypes import DTYPES
from minivllm.engine.json_file import read_json_object
from minivllm.engine.qwen3 import ModelArgs
from minivllm.engine.sampling_params import LIBRARY_DEFAULTS, SamplingParams
from minivllm.values import is_int, is_real


def _read_config(path: Path) -> tuple[dict, Path]:
    """(config.json as a dict, its path), once the directory is a Qwen3 checkpoint with weights."""
    if not path.is_dir():
        raise ValueError(f"model must be a checkpoint directory, but {str(path)!r} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    config = read_json_object(config_file)
    if config.get("model_type") != "qwen3":
        raise ValueError(f"model {str(path)!r} is a {config.get('model_type')!r} checkpoint; this engine runs model_type 'qwen3'")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights")
    return config, config_file


def _positive_int(config: dict, key: str, file: Path, default: int | None = None) -> int:
    """config[key] as a positive int; `default` when absent or null, or ValueError if there is none."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"{file} lacks {key!r}, which a Qwen3 config needs (a positive int)")
        return default
    if not is_int(value) or value < 1:  # JSON true is no layer count
        raise ValueError(f"{file}: {key!r} must be a positive int, got {value!r}")
    return value


def _positive_number(config: dict, key: str, file: Path, default: float, label: str | None = None) -> float:
    """config[key] as a finite number > 0 (`default` when absent or null); `label` names nested keys."""
    value = config.get(key)
    if value is None:
        return default
    if not is_real(value) or value <= 0:
        raise ValueError(f"{file}: {label or key!r} must be a finite number > 0, got {value!r}")
    return float(value)


def _flag(config: dict, key: str, file: Path, default: bool) -> bool:
    """config[key] as a JSON boolean; a string such as "false" would otherwise read as true."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{file}: {key!r} must be true or false, got {value!r}")
    return value


def _ids(config: dict, file: Path) -> list[int]:
    """config's eos_token_id (one id, a list of them, or null) as a list of non-negative ints."""
    value = config.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{file}: 'eos_token_id' must be a token id >= 0, a list of them, or null, got {value!r}")
    return ids


def _dict(config: dict, key: str, file: Path) -> dict:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{file}: {key!r} must be a JSON object or null, got {value!r}")
    return value


def _rope_theta(config: dict, file: Path) -> float:
    """RoPE's base; ValueError for a RoPE scaling this engine does not implement."""
    # transformers 5 writes rope settings under rope_parameters; older checkpoints at top level.
    rope, scaling = _dict(config, "rope_parameters", file), _dict(config, "rope_scaling", file)
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"model {str(file.parent)!r} uses rope_type {kind!r}; only the default RoPE is implemented")
    if "rope_theta" in rope:
        return _positive_number(rope, "rope_theta", file, 10000.0, label="'rope_parameters.rope_theta'")
    return _positive_number(config, "rope_theta", file, 10000.0)


def _check_unsupported(config: dict, file: Path) -> None:
    """ValueError for settings the model would otherwise silently ignore."""
    if config.get("quantization_config") is not None:
        raise ValueError(f"{file} has a quantization_config; this engine loads unquantized (float) weights only")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{file}: 'hidden_act' is {act!r}; the Qwen3 MLP here is SiLU-gated ('silu')")
    if _flag(config, "use_sliding_window", file, False):
        raise ValueError(f"{file}: 'use_sliding_window' is true; sliding-window attention is not implemented")


def _dtype(config: dict, file: Path) -> torch.dtype:
    """The checkpoint's dtype; a name this engine does not run (float64, say) falls back to float32,
    which Config(dtype=...) can override in any case."""
    key = "dtype" if config.get("dtype") is not None else "torch_dtype"
    name = config.get(key) or "float32"
    if not isinstance(name, str):
        raise ValueError(f"{file}: {key!r} must be a dtype name such as 'bfloat16', got {name!r}")
    return DTYPES.get(name, torch.float32)


def load_model_args(model_dir: str | Path) -> ModelArgs:
    """ModelArgs from a checkpoint's config.json; ValueError for a directory that is missing, not
    Qwen3, weightless, asks for a RoPE scaling this engine does not implement, or whose
    config.json (or generation_config.json) lacks a field or gives one of the wrong type or range.
    Every error names the file and the key."""
    path = Path(model_dir)
    config, file = _read_config(path)
    _check_unsupported(config, file)
    hidden = _positive_int(config, "hidden_size", file)
    heads = _positive_int(config, "num_attention_heads", file)
    kv_heads = _positive_int(config, "num_key_value_heads", file, default=heads)
    if heads % kv_heads:
        raise ValueError(f"{file}: 'num_attention_heads' ({heads}) must be a multiple of 'num_key_value_heads' ({kv_heads})")
    if config.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{file} has no 'head_dim', and 'hidden_size' ({hidden}) does not divide by 'num_attention_heads' ({heads})")
    head_dim = _positive_int(config, "head_dim", file, default=hidden // heads)
    if head_dim % 2:
        raise ValueError(f"{file}: 'head_dim' (or hidden_size / num_attention_heads) must be even for RoPE's rotated pairs, got {head_dim}")
    # generation_config.json often lists more stop ids than config.json (Qwen3: <|im_end|> too).
    eos_ids = _ids(config, file)
    generation = path / "generation_config.json"
    if generation.is_file():
        eos_ids += _ids(read_json_object(generation), generation)
    return ModelArgs(
        vocab_size=_positive_int(config, "vocab_size", file),
        hidden_size=hidden,
        intermediate_size=_positive_int(config, "intermediate_size", file),
        num_layers=_positive_int(config, "num_hidden_layers", file),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_number(config, "rms_norm_eps", file, 1e-6),
        rope_theta=_rope_theta(config, file),
        tie_word_embeddings=_flag(config, "tie_word_embeddings", file, False),
        attention_bias=_flag(config, "attention_bias", file, False),
        max_position_embeddings=_positive_int(config, "max_position_embeddings", file, default=32768),
        torch_dtype=_dtype(config, file),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
    )


def load_generation_defaults(model_dir: str | Path) -> dict:
    """The sampling defaults of a checkpoint's generation_config.json: those of temperature, top_k,
    top_p and min_p it sets (not null), as vLLM's generation_config="auto" takes them; {} without
    the file. do_sample is not read, as vLLM does not read it: transformers decodes greedily under
    `"do_sample": false` whatever the temperature, but the checkpoints that write it (transformers'
    own default, and write_random_qwen3's) mostly set no sampling field at all, so sampling stays
    as the request and the library defaults say; a request wants temperature 0 for greedy. Other keys (repetition_penalty, max_new_tokens, ...) are not taken: this engine has no such
    penalty, and a request's length is its own max_tokens. ValueError naming the file and the key
    for a value a request could not give."""
    file = Path(model_dir) / "generation_config.json"
    if not file.is_file():
        return {}
    config = read_json_object(file)
    defaults = {key: config[key] for key in LIBRARY_DEFAULTS if config.get(key) is not None}
    for key, value in defaults.items():
        try:
            SamplingParams(**{key: value})  # the checks a request's own value gets
        except ValueError as e:
            raise ValueError(f"{file}: {key!r}: {e}") from None
    return defaults
