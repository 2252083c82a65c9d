"""Reading a Hugging Face Qwen3 checkpoint's safetensors shards (one or many) into the model's
fused projections (minivllm/engine/checkpoint_config.py reads its config.json). Under tensor parallelism a
rank reads only its slice of each tensor (safetensors slices), so its memory scales with 1/N.

Loading is all or nothing: the weights are checked against config.json before any is copied.
Every tensor a Qwen3 of that config has must appear exactly once, with the full shape
config.json implies (each part of a fused projection and each rank's slice included); a tensor
the model has no place for is an error too. Otherwise a parameter
would silently keep its random initial values and the model's output would change run to run.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minivllm.engine.qwen3 import ModelArgs, Qwen3ForCausalLM
from minivllm.engine.tensor_parallel import TPGroup

# Checkpoint projection name -> (fused parameter name, shard index).
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Tensors real checkpoints carry that the model recomputes instead: older transformers saved the
# rotary embedding's inverse frequencies as a buffer of every attention layer.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
LISTED = 8  # how many names an error about many tensors spells out




@dataclass(frozen=True)
class Expected:
    """A checkpoint tensor a Qwen3 of some config has: its full shape (every rank's slices
    together), the same in config.json's terms, and the model parameter it fills (None: checked,
    then ignored). `required`: a checkpoint without it is refused."""

    shape: tuple[int, ...]
    dims: tuple[str, ...]
    param: str | None
    required: bool = True


def expected_tensors(args: ModelArgs) -> dict[str, Expected]:
    """Every tensor a Hugging Face Qwen3 checkpoint of `args` may hold, by checkpoint name.

    A tied lm_head (tie_word_embeddings true) is optional and fills nothing: the model reads its
    output projection from embed_tokens, as transformers does, so a tied checkpoint that still
    ships lm_head.weight has only its shape checked."""
    sizes = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "head_dim": args.head_dim,
        "num_attention_heads * head_dim": args.num_heads * args.head_dim,
        "num_key_value_heads * head_dim": args.num_kv_heads * args.head_dim,
    }
    hidden, q, kv, ffn = "hidden_size", "num_attention_heads * head_dim", "num_key_value_heads * head_dim", "intermediate_size"
    dims = {"model.embed_tokens.weight": ("vocab_size", hidden), "model.norm.weight": (hidden,), "lm_head.weight": ("vocab_size", hidden)}
    for i in range(args.num_layers):
        layer = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q, hidden),
            "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden),
            "self_attn.o_proj.weight": (hidden, q),
            "self_attn.q_norm.weight": ("head_dim",),
            "self_attn.k_norm.weight": ("head_dim",),
            "mlp.gate_proj.weight": (ffn, hidden),
            "mlp.up_proj.weight": (ffn, hidden),
            "mlp.down_proj.weight": (hidden, ffn),
        }
        if args.attention_bias:
            layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (hidden,)}
        dims |= {f"model.layers.{i}.{name}": d for name, d in layer.items()}
    expected = {name: Expected(tuple(sizes[d] for d in ds), ds, _target(name)[0]) for name, ds in dims.items()}
    if args.tie_word_embeddings:
        expected["lm_head.weight"] = Expected(expected["lm_head.weight"].shape, dims["lm_head.weight"], None, required=False)
    return expected


@contextmanager
def _open(file: Path) -> Iterator:
    """safe_open(file), with a truncated or corrupt file reported as a ValueError naming it."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _listed(items: list[str]) -> str:
    """The first LISTED items, and how many more there are."""
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def _index(model_dir: Path, expected: dict[str, Expected], args: ModelArgs) -> dict[str, Path]:
    """Which file holds each expected tensor, once every shard's header has been checked against
    config.json: each tensor present at most once and with its full shape, none unexpected, none
    required missing. Reads headers only, so a bad checkpoint fails before any weight is copied."""
    where: dict[str, Path] = {}
    unexpected: list[str] = []
    config = model_dir / "config.json"
    for file in sorted(model_dir.glob("*.safetensors")):
        with _open(file) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith(SKIPPED_SUFFIXES):
                    continue
                if name not in expected:
                    unexpected.append(f"{name!r} (in {file.name})")
                    continue
                if name in where:
                    raise ValueError(f"tensor {name!r} appears twice, in {where[name]} and in {file}; each tensor must be in one shard")
                _check_shape(name, file, tuple(f.get_slice(name).get_shape()), expected[name], config)
                where[name] = file
    if unexpected:
        raise ValueError(
            f"checkpoint {str(model_dir)!r} holds {len(unexpected)} tensor(s) that a Qwen3 model of its config.json "
            f"({args.num_layers} layers, attention_bias {str(args.attention_bias).lower()}) has no place for: {_listed(unexpected)}"
        )
    missing = [name for name, want in expected.items() if want.required and name not in where]
    if missing:
        listed = _listed([f"{name!r} of shape {expected[name].shape}" for name in missing])
        # An untied config over a tied checkpoint (no lm_head) is a likely slip: say so.
        hint = "; if lm_head shares embed_tokens' weights, config.json must say tie_word_embeddings: true" if "lm_head.weight" in missing else ""
        raise ValueError(f"checkpoint {str(model_dir)!r} lacks {len(missing)} tensor(s) its config.json implies: {listed}{hint}")
    return where


def _check_shape(name: str, file: Path, shape: tuple[int, ...], want: Expected, config: Path) -> None:
    if shape != want.shape:
        raise ValueError(f"{file}: tensor {name!r} has shape {shape}, but {config} implies {want.shape} ({', '.join(want.dims)})")


def load_weights(model: Qwen3ForCausalLM, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor (this rank's slice of it) into `model`, splitting q/k/v and
    gate/up into the fused projections. ValueError, before anything is copied, for a tensor that
    is missing, present twice, of another shape than config.json implies or with no place in the
    model, and for a shard that cannot be read; each error names the tensor and the file."""
    model_dir, args = Path(model_dir), model.args
    params = dict(model.named_parameters())  # a tied lm_head is embed_tokens' parameter, listed once
    expected = expected_tensors(args)
    filled = {want.param for want in expected.values() if want.param is not None}
    if filled != set(params):  # a parameter no tensor fills would keep its random initial values
        raise RuntimeError(f"the loader and Qwen3ForCausalLM disagree on the parameters: {sorted(filled ^ set(params))}")
    by_file: dict[Path, list[str]] = {}
    for name, file in _index(model_dir, expected, args).items():
        if expected[name].param is not None:
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                dest = _destination(model, params, name, expected[name].param)
                tensor = _read_slice(f.get_slice(name), name, args, model.tp)
                if dest.shape != tensor.shape:  # a slice of a checked full shape: only a loader bug gets here
                    raise RuntimeError(f"{file}: the slice {tuple(tensor.shape)} of {name!r} does not fit {tuple(dest.shape)}")
                with torch.no_grad():
                    dest.copy_(tensor)


def _destination(model: Qwen3ForCausalLM, params: dict, name: str, param: str) -> torch.Tensor:
    """The part of `param` that checkpoint tensor `name` fills on this rank."""
    dest = params[param]
    _, fused, shard = _target(name)
    if fused:
        rows = _fused_rows(model, fused)
        dest = dest.narrow(0, sum(rows[:shard]), rows[shard])
    if param in ("embed_tokens.weight", "lm_head.weight"):
        # Every rank holds ceil(vocab / size) rows; the last rank's extra rows are padding.
        dest = dest.narrow(0, 0, len(model.tp.vocab(model.args.vocab_size)))
    return dest


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
