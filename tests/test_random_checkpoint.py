"""The random-weight Qwen3 checkpoints: files, the weights' names, shapes and distributions,
loading in transformers and in the engine with the same logits, shards, non-degenerate greedy
output, tied embeddings, the tokenizer, the writer's independence from transformers, and the
cached demo checkpoint."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import minivllm.testing.random_checkpoint as rc
from minivllm.engine.attention import AttentionMetadata
from minivllm.engine.backend import TORCH
from minivllm.engine.checkpoint_config import load_model_args
from minivllm.engine.loader import load_weights
from minivllm.engine.qwen3 import Qwen3ForCausalLM
from minivllm.reference import rope_cos_sin
from minivllm.testing.random_checkpoint import default_checkpoint, write_random_qwen3
from minivllm.testing.transformers_reference import load_transformers_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
# GQA, head_dim 32 (the kernels take powers of two only), an odd layer count.
SMALL = dict(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, with_tokenizer=False, device="cpu")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in `path`, by name."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors


def hf_model(path: Path):
    """transformers' float32 Qwen3 of `path`, through the one loader that turns Hub kernels off
    (tests/test_packaging.py holds every model load to it)."""
    model = load_transformers_model(path, dtype=torch.float32)
    assert getattr(model, "use_kernels", False) is False
    return model


def assert_holds_exactly(model, written: dict[str, torch.Tensor]) -> None:
    """transformers' parameters are exactly the tensors we wrote: no name it expects is missing
    (it would keep a random init), none we wrote goes unused, every value is equal. A tied model's
    lm_head is embed_tokens itself."""
    state = model.state_dict()
    tied = "lm_head.weight" not in written
    assert set(state) == set(written) | {"lm_head.weight"}
    for name, t in written.items():
        assert torch.equal(state[name], t), name
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def engine_model(path: Path) -> Qwen3ForCausalLM:
    """The engine's model of `path` with the torch backend, loaded as LLM(path) loads it."""
    model = Qwen3ForCausalLM(load_model_args(path), TORCH)
    load_weights(model, path)
    return model.eval()


@torch.no_grad()
def engine_logits(model: Qwen3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) of one prompt `ids` (n,) prefilled in one step, into a one-block cache."""
    n, args = len(ids), model.args
    bounds = torch.tensor([0, n], dtype=torch.int32)
    meta = AttentionMetadata(True, torch.arange(n, dtype=torch.int32), cu_seqlens_q=bounds, cu_seqlens_k=bounds, max_seqlen_q=n, max_seqlen_k=n)
    caches = [tuple(torch.zeros(1, n, args.num_kv_heads, args.head_dim) for _ in range(2)) for _ in range(args.num_layers)]
    return model.compute_logits(model(ids, torch.arange(n), caches, meta))


def assert_close_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal within 1e-4 of the logits' scale: float32 summation order is all that may differ."""
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("tiny"), device="cpu")


def test_writes_model_and_tokenizer_files(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["num_hidden_layers"] == 2 and config["head_dim"] == 32
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0} and config["rope_theta"] == 10000.0
    assert config["dtype"] == config["torch_dtype"] == "float32"
    args = load_model_args(ckpt)
    assert (args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim, args.rope_theta) == (2, 4, 2, 32, 10000.0)
    assert args.eos_token_ids == (config["eos_token_id"],)
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["eos_token_id"] == config["eos_token_id"]


def test_without_tokenizer_writes_no_tokenizer_files(tmp_path):
    path = write_random_qwen3(tmp_path, with_tokenizer=False, device="cpu")
    names = {p.name for p in path.iterdir()}
    assert "config.json" in names and "model.safetensors" in names
    assert not any(n.startswith(("tokenizer", "vocab", "merges", "special_tokens")) for n in names)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 256


def test_json_and_tokenizer_files_are_written_atomically(tmp_path, monkeypatch):
    """config, generation config, index and tokenizer files are renamed into place whole; only the
    shards (large, and a cache is built in a temporary directory renamed whole) are written in place."""
    replaced, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (real(src, dst), replaced.append(Path(dst).name)))
    path = write_random_qwen3(tmp_path, max_shard_bytes=40_000, **(SMALL | dict(with_tokenizer=True)))
    assert sorted(replaced) == sorted(p.name for p in path.iterdir() if not p.name.endswith(".safetensors"))
    assert set(replaced) == {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"}


def test_tokenizer_matches_the_tokenizers_library_and_the_config(ckpt):
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    config = transformers.AutoConfig.from_pretrained(ckpt)
    texts = ["Hello, how are you today?", "The capital of France is Paris.\n\tÜnïcödé ✓ 漢字", "<|im_start|>user\nHi<|im_end|>\n"]
    for text in texts:
        ids = tok(text).input_ids
        assert ids == raw.encode(text).ids
        assert tok.decode(ids) == raw.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=True) == raw.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert len(tok("the scheduler").input_ids) < len(b"the scheduler")  # merges were learned
    assert config.vocab_size >= len(tok) and config.vocab_size % 64 == 0
    specials = [raw.token_to_id(t) for t in rc.SPECIAL_TOKENS]
    assert set(specials) <= set(tok.all_special_ids)
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == raw.token_to_id("<|endoftext|>") == config.eos_token_id == config.bos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_loads_the_tensors_and_agrees_with_the_engine(tmp_path, tied):
    """transformers finds every tensor under its own name, holds exactly what we wrote, and its
    logits equal the engine's; a wrong norm weight in the engine would show."""
    path = write_random_qwen3(tmp_path, tie_word_embeddings=tied, seed=1, **SMALL)
    written = read_tensors(path)
    assert ("lm_head.weight" in written) is not tied
    hf = hf_model(path)
    assert_holds_exactly(hf, written)
    ids = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0]
    ours = engine_model(path)
    assert_close_logits(engine_logits(ours, ids), theirs)
    ours.layers[1].self_attn.k_norm.weight.data.fill_(1.0)  # what a loader that skipped it would leave
    with pytest.raises(AssertionError):
        assert_close_logits(engine_logits(ours, ids), theirs)


def test_shards_and_index_load_as_one_file_does(tmp_path):
    whole = write_random_qwen3(tmp_path / "whole", **SMALL)
    sharded = write_random_qwen3(tmp_path / "sharded", max_shard_bytes=40_000, **SMALL)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = read_tensors(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"].values()) == set(files)
    for file in files:
        with safe_open(str(sharded / file), "pt") as f:
            assert {name for name, where in index["weight_map"].items() if where == file} == set(f.keys())
            assert sum(f.get_tensor(k).numel() * 4 for k in f.keys()) <= 40_000 or len(f.keys()) == 1
    expected = read_tensors(whole)
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)
    assert_holds_exactly(hf_model(sharded), expected)
    ours, reference = engine_model(sharded).state_dict(), engine_model(whole).state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    rewritten = write_random_qwen3(sharded, **SMALL)  # an earlier write's shards do not linger
    assert [p.name for p in rewritten.glob("*.safetensors")] == ["model.safetensors"] and not (rewritten / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,tied",
    [(4, 2, 32, False), (4, 1, 64, True), (4, 4, 128, False), (4, 2, 128, True)],
)
def test_greedy_generation_is_not_one_repeated_token(tmp_path, heads, kv_heads, head_dim, tied):
    path = write_random_qwen3(tmp_path, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=tied, device="cpu")
    model = hf_model(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("Once upon a time there was", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    new = out[0, ids.shape[1] :].tolist()
    assert len(set(new)) > 3, new
    assert torch.isfinite(logits).all()
    top2 = logits[0].topk(2, dim=-1).values
    assert (top2[:, 0] > top2[:, 1]).all()  # no exact ties for argmax
    assert 1 < logits.std().item() < 10


def test_tied_embeddings_show_in_config_and_tensors(tmp_path):
    untied = write_random_qwen3(tmp_path / "untied", with_tokenizer=False, device="cpu")
    tied = write_random_qwen3(tmp_path / "tied", with_tokenizer=False, tie_word_embeddings=True, device="cpu")
    assert json.loads((untied / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" in read_tensors(untied)
    assert "lm_head.weight" not in read_tensors(tied)
    assert "model.embed_tokens.weight" in read_tensors(tied)


def test_seeded_and_shaped(tmp_path):
    kw = dict(with_tokenizer=False, num_heads=4, num_kv_heads=1, head_dim=64, hidden_size=48, intermediate_size=80, device="cpu")
    a = read_tensors(write_random_qwen3(tmp_path / "a", seed=3, **kw))
    b = read_tensors(write_random_qwen3(tmp_path / "b", seed=3, **kw))
    c = read_tensors(write_random_qwen3(tmp_path / "c", seed=4, **kw))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    layer = {k.removeprefix("model.layers.1."): tuple(t.shape) for k, t in a.items() if k.startswith("model.layers.1.")}
    assert layer == {
        "input_layernorm.weight": (48,),
        "post_attention_layernorm.weight": (48,),
        "self_attn.q_proj.weight": (4 * 64, 48),
        "self_attn.k_proj.weight": (1 * 64, 48),
        "self_attn.v_proj.weight": (1 * 64, 48),
        "self_attn.o_proj.weight": (48, 4 * 64),
        "self_attn.q_norm.weight": (64,),
        "self_attn.k_norm.weight": (64,),
        "mlp.gate_proj.weight": (80, 48),
        "mlp.up_proj.weight": (80, 48),
        "mlp.down_proj.weight": (48, 80),
    }
    assert a["model.embed_tokens.weight"].shape == a["lm_head.weight"].shape == (256, 48)
    assert len(a) == 3 + 2 * len(layer)


def test_weight_distributions(tmp_path):
    """Matrices N(0, (init_std / sqrt(fan_in))^2), embedding and lm_head N(0, 1 / hidden), norms
    U(0.5, 1.5), the final one times LOGIT_SCALE."""
    hidden, inter = 128, 384
    w = read_tensors(write_random_qwen3(tmp_path, with_tokenizer=False, hidden_size=hidden, intermediate_size=inter, head_dim=64, init_std=1.5, device="cpu"))
    stds = {
        "model.layers.0.self_attn.q_proj.weight": 1.5 / math.sqrt(hidden),
        "model.layers.0.self_attn.o_proj.weight": 1.5 / math.sqrt(4 * 64),
        "model.layers.1.mlp.up_proj.weight": 1.5 / math.sqrt(hidden),
        "model.layers.1.mlp.down_proj.weight": 1.5 / math.sqrt(inter),
        "model.embed_tokens.weight": 1 / math.sqrt(hidden),
        "lm_head.weight": 1 / math.sqrt(hidden),
    }
    for name, std in stds.items():
        assert w[name].mean().abs() < 0.05 * std, name
        assert w[name].std().item() == pytest.approx(std, rel=0.05), name
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_norm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert 0.5 <= w[name].min() < 0.6 and 1.4 < w[name].max() <= 1.5, name
    final = w["model.norm.weight"] / rc.LOGIT_SCALE
    assert 0.5 <= final.min() < 0.6 and 1.4 < final.max() <= 1.5
    assert not torch.equal(w["model.layers.0.input_layernorm.weight"], w["model.layers.1.input_layernorm.weight"])


def test_dtype_is_a_cast_of_the_float32_draw(tmp_path):
    path = write_random_qwen3(tmp_path / "bf16", with_tokenizer=False, dtype=torch.bfloat16, device="cpu")
    bf16, fp32 = read_tensors(path), read_tensors(write_random_qwen3(tmp_path / "fp32", with_tokenizer=False, device="cpu"))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert load_model_args(path).torch_dtype == torch.bfloat16


def test_writer_on_the_test_device_loads(tmp_path, device):
    """The default device (the GPU when there is one) gives a checkpoint both loaders take."""
    path = write_random_qwen3(tmp_path, seed=2, **(SMALL | {"device": device}))
    written = read_tensors(path)
    assert_holds_exactly(hf_model(path), written)
    assert torch.equal(engine_model(path).norm.weight, written["model.norm.weight"])


def test_writer_does_not_import_transformers(tmp_path):
    code = f"import sys; from minivllm.testing.random_checkpoint import write_random_qwen3; write_random_qwen3({str(tmp_path)!r}, device='cpu'); print('transformers' in sys.modules)"
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_default_checkpoint_is_built_once_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = default_checkpoint()
    assert first.parent == tmp_path / "cache" / "minivllm" and first.name == f"tiny-qwen3-{rc.CHECKPOINT_VERSION}"
    assert (first / "tokenizer.json").is_file()
    cpu = read_tensors(write_random_qwen3(tmp_path / "cpu", device="cpu"))
    cached = read_tensors(first)
    assert cached.keys() == cpu.keys() and all(torch.equal(cached[k], cpu[k]) for k in cpu)
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("default_checkpoint rebuilt a cached checkpoint")

    monkeypatch.setattr(rc, "write_random_qwen3", no_rebuild)
    assert default_checkpoint() == first
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache" / "minivllm").iterdir()] == [first.name]  # no temp dirs left


def test_default_checkpoint_falls_back_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_checkpoint().parent == tmp_path / ".cache" / "minivllm"


def test_default_checkpoint_crash_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def crash(path, **kwargs):
        (path / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(rc, "write_random_qwen3", crash)
    with pytest.raises(KeyboardInterrupt):
        default_checkpoint()
    assert list((tmp_path / "minivllm").iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=True), "num_layers must be an int >= 1, got True"),
        (dict(num_layers=2.0), "num_layers must be an int >= 1, got 2.0"),
        (dict(hidden_size=0), "hidden_size must be an int >= 1, got 0"),
        (dict(num_heads="4"), "num_heads must be an int >= 1, got '4'"),
        (dict(num_kv_heads=0), "num_kv_heads must be an int >= 1, got 0"),
        (dict(num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        (dict(head_dim=31), "head_dim must be even"),
        (dict(intermediate_size=-1), "intermediate_size must be an int >= 1"),
        (dict(vocab_size=True, with_tokenizer=False), "vocab_size must be an int >= 1 or None, got True"),
        (dict(vocab_size=100), r"vocab_size \(100\) must hold the tokenizer's"),
        (dict(tie_word_embeddings="no"), "tie_word_embeddings must be a bool, got 'no'"),
        (dict(with_tokenizer=1), "with_tokenizer must be a bool, got 1"),
        (dict(init_std=0), "init_std must be a finite number > 0, got 0"),
        (dict(init_std=float("nan")), "init_std must be a finite number > 0"),
        (dict(init_std=True), "init_std must be a finite number > 0, got True"),
        (dict(rope_theta=-1.0), "rope_theta must be a finite number > 0"),
        (dict(rope_theta="1e4"), "rope_theta must be a finite number > 0"),
        (dict(max_position_embeddings=0), "max_position_embeddings must be an int >= 1"),
        (dict(seed=True), "seed must be an int >= 0, got True"),
        (dict(seed=-1), "seed must be an int >= 0"),
        (dict(dtype=torch.float64), r"dtype must be one of \['bfloat16', 'float16', 'float32'\]"),
        (dict(dtype=5), "dtype must be one of"),
        (dict(dtype="fp16"), "dtype must be one of"),
        (dict(max_shard_bytes=0), "max_shard_bytes must be an int >= 1, got 0"),
        (dict(max_shard_bytes=1e9), "max_shard_bytes must be an int >= 1, got 1000000000.0"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, match):
    """Each once wrote a checkpoint the engine refuses or misreads (True layers as 1, a float64
    checkpoint, a tokenizer for with_tokenizer=1's truthiness), or died in the middle with a
    ZeroDivisionError or AttributeError."""
    with pytest.raises(ValueError, match=f"^{match}"):
        write_random_qwen3(tmp_path / "ckpt", device="cpu", **kwargs)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_models_rope_table_holds_the_references_values(ckpt, dtype):
    """A step's cos and sin are gathered from the model's table of every position: the very values
    the reference computes, at the first and last positions the checkpoint allows and scattered
    ones between; asking in another dtype rebuilds the table in it."""
    model = engine_model(ckpt)
    args = model.args
    gen = torch.Generator().manual_seed(3)
    positions = torch.cat([torch.tensor([0, args.max_position_embeddings - 1]), torch.randint(0, args.max_position_embeddings, (37,), generator=gen)])
    for want_dtype in (dtype, torch.float16):
        got = model.rope(positions, want_dtype)
        want = rope_cos_sin(positions, args.head_dim, args.rope_theta, want_dtype)
        assert all(g.dtype == want_dtype and torch.equal(g, w) for g, w in zip(got, want, strict=True))
