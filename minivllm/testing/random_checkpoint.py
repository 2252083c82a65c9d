"""Tiny Qwen3 checkpoints with seeded random weights, for tests, benchmarks and the offline demo.

`write_random_qwen3(path)` writes a Hugging Face checkpoint directory (config.json,
generation_config.json, safetensors shards and optionally a small byte-level BPE tokenizer
trained here on a built-in corpus) that `transformers` and the engine both load. It needs no
network and imports nothing from transformers: each tensor is drawn straight from a seeded
generator on the chosen device, so even a Qwen3-8B-shaped checkpoint is quick to write. The
weights are random, so the model's text is gibberish; what matters is that it is deterministic,
well-conditioned and that greedy decoding does not collapse into one repeated token, so
engine-vs-Hugging-Face comparisons exercise real attention over a varied context.

`default_checkpoint()` builds one such checkpoint once under the user cache directory and
reuses it afterwards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from minivllm.atomic_write import write_atomic
from minivllm.dtypes import check_dtype, dtype_name
from minivllm.values import check_bool, check_int, is_real

# Bump when the builder's output changes, so default_checkpoint() stops reusing a stale cache.
CHECKPOINT_VERSION = "v2"

# Linear weights are drawn N(0, (init_std / sqrt(fan_in))^2): every projection then maps a
# unit-RMS input to a roughly init_std-RMS output whatever the width, so one default suits every
# shape. A gain of 2 makes the layers' residual updates dominate the (unit-norm) embedding, so the
# next token depends on the context, not just on the current token; at 0.5 (or with unit-RMS embedding rows and
# a tied lm_head) greedy decoding mostly repeats one token. Measured over (heads, kv_heads) in
# {(4,2),(4,1),(4,4)}, head_dim in {32,64,128}, tied and untied, 1, 2 (two seeds) and 4 layers:
# 24 greedy tokens always held at least 3 distinct ones, 18 on average; hidden RMS < 20 up to 8 layers.
DEFAULT_INIT_STD = 2.0
# Multiplies the final RMSNorm weights: the logits then have a standard deviation of about this.
LOGIT_SCALE = 3.0
# Shards stay below this many bytes (a bigger tensor gets a shard of its own), so the host holds
# at most about one shard's tensors at a time.
DEFAULT_MAX_SHARD_BYTES = 4 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|endoftext|>"
BPE_VOCAB_SIZE = 480  # bytes (256) + special tokens + at most 221 merges; 512 model rows, like Qwen3 some unused
NO_TOKENIZER_VOCAB_SIZE = 256

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# tokenizer_config.json as a Hugging Face checkpoint carries it. As in Qwen3's, bos and eos are
# both <|endoftext|>, and bos is never prepended. No added_tokens_decoder: transformers reads the
# special tokens' flags from tokenizer.json.
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": EOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != EOS_TOKEN],
    "model_max_length": 1 << 20,
    "chat_template": CHAT_TEMPLATE,
    "add_bos_token": False,
    "clean_up_tokenization_spaces": False,
}

# Training text for the toy tokenizer: plain English, so common words get their own tokens.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and
predicts the next one. The engine keeps the keys and values of every token in a cache, split into
blocks of a fixed size, so that many requests can share the memory of one device. When a request
arrives, the scheduler decides whether there is room for its prompt; if there is, the prompt is
processed in one step, which is called the prefill. After that, every step adds one token to each
running sequence, which is called the decode. When the cache is full, the scheduler preempts the
youngest sequence and gives its blocks back, and the sequence starts again later.
Once upon a time there was a little village by the sea. The people of the village were fishermen,
and every morning they went out in their boats before the sun came up. In the evening they came
home, and the children ran down to the water to see what their fathers had caught. One day a
stranger came to the village with a small box under his arm. Nobody knew what was in the box, and
the stranger would not say. He stayed at the inn for three days, and on the fourth day he was gone.
Hello, how are you today? I am fine, thank you. What is the capital of France? The capital of
France is Paris. What is two plus two? Two plus two is four. Tell me a story about a dragon who
learned to read. Write a short poem about the moon and the stars. Explain why the sky is blue.
The sky is blue because the air scatters the blue light of the sun more than the red light.
Water boils at one hundred degrees at the level of the sea, and it freezes at zero degrees.
There are seven days in a week, twelve months in a year, and about three hundred and sixty five
days in a year. The first computers filled whole rooms; today a phone in your pocket is faster.
"""


def _build_tokenizer():
    """A tokenizers.Tokenizer: byte-level BPE trained on CORPUS, with SPECIAL_TOKENS as its first
    ids, added as special tokens (never split, dropped by decode(skip_special_tokens=True))."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def _tensor_shapes(sizes: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Qwen3 checkpoint (no attention bias) whose config.json
    holds `sizes`, by name, in writing order; a tied lm_head is embed_tokens' and has no tensor of
    its own."""
    hidden, inter, vocab, head_dim = sizes["hidden_size"], sizes["intermediate_size"], sizes["vocab_size"], sizes["head_dim"]
    q, kv = sizes["num_attention_heads"] * head_dim, sizes["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(sizes["num_hidden_layers"]):
        layer = {
            "input_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q, hidden),
            "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden),
            "self_attn.o_proj.weight": (hidden, q),
            "self_attn.q_norm.weight": (head_dim,),
            "self_attn.k_norm.weight": (head_dim,),
            "post_attention_layernorm.weight": (hidden,),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    shapes["model.norm.weight"] = (hidden,)
    if not sizes["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _draw(name: str, shape: tuple[int, ...], init_std: float, gen: torch.Generator) -> torch.Tensor:
    """One float32 tensor on gen's device. RMSNorm weights (1-D): U(0.5, 1.5), not ones, so a
    loader that drops them shows; the final norm's are also scaled by LOGIT_SCALE, which sets the
    logits' spread. Embedding and lm_head rows: N(0, 1 / hidden), unit norm, so the embedding is
    small next to the layers' residual updates (else a tied lm_head just predicts the current
    token again). Other matrices: N(0, (init_std / sqrt(fan_in))^2), fan_in = shape[1], so each
    projection maps a unit-RMS input to an init_std-RMS output."""
    if len(shape) == 1:
        w = 0.5 + torch.rand(shape, generator=gen, device=gen.device)
        return w * LOGIT_SCALE if name == "model.norm.weight" else w
    gain = 1.0 if name in ("model.embed_tokens.weight", "lm_head.weight") else init_std
    return torch.randn(shape, generator=gen, device=gen.device) * (gain / math.sqrt(shape[1]))


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Tensor names split, in order, into shards of at most max_bytes each (or one tensor)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _shard_files(count: int) -> list[str]:
    """File names of `count` shards, as transformers names them."""
    return [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_weights(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, init_std: float, gen: torch.Generator, max_shard_bytes: int) -> None:
    """Draw every tensor in order from `gen` (float32, then cast to dtype) and write the shards,
    one at a time, plus the index when there is more than one; the weight files of an earlier
    write into `path` are removed first."""
    itemsize = dtype.itemsize
    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:  # the loader would read a stale shard too
        old.unlink(missing_ok=True)
    shards = _plan_shards(shapes, itemsize, max_shard_bytes)
    files = _shard_files(len(shards))
    for names, file in zip(shards, files, strict=True):
        tensors = {name: _draw(name, shapes[name], init_std, gen).to(dtype).cpu() for name in names}
        save_file(tensors, path / file, metadata={"format": "pt"})
    if len(files) > 1:
        total = sum(math.prod(shape) * itemsize for shape in shapes.values())
        weight_map = {name: file for names, file in zip(shards, files, strict=True) for name in names}
        _write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _model_config(sizes: dict, token_ids: dict, dtype: torch.dtype, init_std: float, rope_theta: float, max_positions: int) -> dict:
    """config.json: what transformers' Qwen3Config needs to build Qwen3ForCausalLM, and what
    minivllm/engine/checkpoint_config.py reads. rope_theta sits both under rope_parameters
    (transformers 5) and at the top level (older readers)."""
    name = dtype_name(dtype)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **sizes,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        "rope_theta": float(rope_theta),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": sizes["num_hidden_layers"],
        **token_ids,
        "dtype": name,
        "torch_dtype": name,
        "initializer_range": init_std / math.sqrt(sizes["hidden_size"]),
        "use_cache": True,
    }


def _write_json(file: Path, value: dict) -> None:
    write_atomic(file, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_random_qwen3(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    init_std: float = DEFAULT_INIT_STD,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    with_tokenizer: bool = True,
    device: str | torch.device | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a random-weight Qwen3 checkpoint (and, if asked, a toy tokenizer) into `path`.

    init_std scales every linear layer relative to 1/sqrt(fan_in) (see DEFAULT_INIT_STD).
    vocab_size defaults to the tokenizer's length rounded up to a multiple of 64, or 256 without
    one; a real model's (151936 for Qwen3) gives its embedding and lm_head their true shape.
    Weights are drawn on `device` (default: cuda when there is one, else cpu) from a generator
    seeded with `seed`, so the same arguments give the same tensors on the same kind of device;
    they are written in `dtype` to shards of at most max_shard_bytes (one model.safetensors when
    everything fits, else model-0000i-of-0000n.safetensors plus model.safetensors.index.json).
    Returns `path` as a Path. Every argument is checked, and ValueError names the one that is
    wrong, before anything is written.
    """
    counts = dict(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings, max_shard_bytes=max_shard_bytes)
    for name, value in counts.items():
        check_int(name, value, 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, for RoPE's rotated pairs, got {head_dim}")
    if vocab_size is not None:
        check_int("vocab_size", vocab_size, 1, " or None")
    for name, value in (("init_std", init_std), ("rope_theta", rope_theta)):
        if not is_real(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    check_int("seed", seed, 0)
    dtype = check_dtype(dtype)
    check_bool("tie_word_embeddings", tie_word_embeddings)
    check_bool("with_tokenizer", with_tokenizer)

    tokenizer = _build_tokenizer() if with_tokenizer else None
    least = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else 1
    if vocab_size is None:
        vocab_size = -(-least // 64) * 64 if tokenizer is not None else NO_TOKENIZER_VOCAB_SIZE
    elif vocab_size < least:
        raise ValueError(f"vocab_size ({vocab_size}) must hold the tokenizer's {least} tokens")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    eos_id = tokenizer.token_to_id(EOS_TOKEN) if tokenizer is not None else None
    token_ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}

    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "tie_word_embeddings": tie_word_embeddings,
    }
    gen = torch.Generator(device=device or _default_device()).manual_seed(seed)
    _write_weights(path, _tensor_shapes(sizes), dtype, init_std, gen, max_shard_bytes)
    _write_json(path / "config.json", _model_config(sizes, token_ids, dtype, init_std, rope_theta, max_position_embeddings))
    _write_json(path / "generation_config.json", token_ids | {"do_sample": False})
    if tokenizer is not None:
        write_atomic(path / "tokenizer.json", tokenizer.to_str(pretty=True))  # what tokenizer.save writes
        _write_json(path / "tokenizer_config.json", TOKENIZER_CONFIG)
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivllm"


def default_checkpoint() -> Path:
    """The demo checkpoint (defaults of write_random_qwen3, with a tokenizer), built once under
    $XDG_CACHE_HOME (or ~/.cache)/minivllm and reused afterwards. Drawn on the CPU, so the cache
    holds the same weights whichever machine built it. It is written to a temporary directory
    beside the target and renamed into place, so a crash never leaves half a cache."""
    root = _cache_root()
    target = root / f"tiny-qwen3-{CHECKPOINT_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        write_random_qwen3(tmp, device="cpu")
        tmp.chmod(0o755)  # mkdtemp made it owner-only
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
