"""Tiny Qwen3 checkpoints with seeded random weights, for tests and the offline demo.

`write_random_qwen3(path)` writes a Hugging Face checkpoint directory (config.json, safetensors,
and optionally a small byte-level BPE tokenizer trained here on a built-in corpus) that
`transformers` and the engine both load. No network is needed. The weights are random, so the
model's text is gibberish; what matters is that it is deterministic, well-conditioned and that
greedy decoding does not collapse into one repeated token, so engine-vs-Hugging-Face comparisons
exercise real attention over a varied context.

`default_checkpoint()` builds one such checkpoint once under the user cache directory and
reuses it afterwards.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Bump when the builder's output changes, so default_checkpoint() stops reusing a stale cache.
CHECKPOINT_VERSION = "v1"

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
    """A byte-level BPE tokenizer trained on CORPUS, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,  # as in Qwen3's config: bos and eos are both <|endoftext|>, never prepended
        pad_token=EOS_TOKEN,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


@torch.no_grad()
def _init_weights(model: torch.nn.Module, init_std: float, seed: int) -> None:
    """Seeded re-initialisation, independent of transformers' own init (which may change between
    releases). Matrices: N(0, (init_std / sqrt(fan_in))^2), so each projection maps a unit-RMS input
    to an init_std-RMS output. Embedding and lm_head rows: N(0, 1 / hidden_size), unit norm, so the
    embedding is small next to the layers' residual updates (else a tied lm_head just predicts the
    current token again). RMSNorm weights: U(0.5, 1.5), not ones, so a loader that drops them shows;
    the final norm's are also scaled by LOGIT_SCALE, which sets the logits' spread."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for name, p in model.named_parameters():  # a tied lm_head shares the embedding and is skipped
        if name.endswith("norm.weight"):
            w = 0.5 + torch.rand(p.shape, generator=gen)
            p.copy_(w * LOGIT_SCALE if name == "model.norm.weight" else w)
        elif p.ndim == 1:
            p.zero_()
        else:
            std = 1 / math.sqrt(hidden) if name in ("model.embed_tokens.weight", "lm_head.weight") else init_std / math.sqrt(p.shape[1])
            p.copy_(torch.randn(p.shape, generator=gen) * std)


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
) -> Path:
    """Write a random-weight Qwen3 checkpoint (and, if asked, a toy tokenizer) into `path`.

    init_std scales every linear layer relative to 1/sqrt(fan_in) (see DEFAULT_INIT_STD).
    vocab_size defaults to the tokenizer's length rounded up to a multiple of 64, or 256 without
    one; a real model's (151936 for Qwen3) gives its embedding and lm_head their true shape.
    Returns `path` as a Path.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    if with_tokenizer:
        tokenizer = _build_tokenizer()
        least = len(tokenizer)
        eos_id = bos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    else:
        tokenizer = None
        least = 1
        eos_id = bos_id = None
    if vocab_size is None:
        vocab_size = -(-least // 64) * 64 if tokenizer is not None else NO_TOKENIZER_VOCAB_SIZE
    elif vocab_size < least:
        raise ValueError(f"vocab_size ({vocab_size}) must hold the tokenizer's {least} tokens")

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std / math.sqrt(hidden_size),
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        sliding_window=None,
        max_window_layers=num_layers,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    model = Qwen3ForCausalLM(config)
    _init_weights(model, init_std, seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.generation_config.do_sample = False
    model.eval()
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is only noise here
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivllm"


def default_checkpoint() -> Path:
    """The demo checkpoint (defaults of write_random_qwen3, with a tokenizer), built once under
    $XDG_CACHE_HOME (or ~/.cache)/minivllm and reused afterwards. It is written to a temporary
    directory beside the target and renamed into place, so a crash never leaves half a cache."""
    root = _cache_root()
    target = root / f"tiny-qwen3-{CHECKPOINT_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        write_random_qwen3(tmp)
        tmp.chmod(0o755)  # mkdtemp made it owner-only
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
