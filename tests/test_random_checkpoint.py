"""The random-weight Qwen3 checkpoints: files, loading in transformers, non-degenerate greedy output,
tied embeddings, tokenizer, and the cached demo checkpoint."""

import json

import pytest
import torch
from safetensors import safe_open

import minivllm.testing.random_checkpoint as rc
from minivllm.testing.random_checkpoint import default_checkpoint, write_random_qwen3

transformers = pytest.importorskip("transformers")


def tensor_names(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def read_tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("tiny"))


def test_writes_model_and_tokenizer_files(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["num_hidden_layers"] == 2 and config["head_dim"] == 32
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    assert rope_theta == 10000.0


def test_without_tokenizer_writes_no_tokenizer_files(tmp_path):
    path = write_random_qwen3(tmp_path, with_tokenizer=False)
    names = {p.name for p in path.iterdir()}
    assert "config.json" in names and "model.safetensors" in names
    assert not any(n.startswith(("tokenizer", "vocab", "merges", "special_tokens")) for n in names)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 256


def test_tokenizer_round_trips_and_matches_config(ckpt):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    config = transformers.AutoConfig.from_pretrained(ckpt)
    for text in ["Hello, how are you today?", "The capital of France is Paris.\n\tÜnïcödé ✓ 漢字"]:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
    assert len(tok("the scheduler").input_ids) < len(b"the scheduler")  # merges were learned
    assert config.vocab_size >= len(tok) and config.vocab_size % 64 == 0
    assert tok.eos_token == "<|endoftext|>"
    assert config.eos_token_id == tok.eos_token_id and config.bos_token_id == tok.bos_token_id
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok(special).input_ids == [tok.convert_tokens_to_ids(special)]
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,tied",
    [(4, 2, 32, False), (4, 1, 64, True), (4, 4, 128, False), (4, 2, 128, True)],
)
def test_greedy_generation_is_not_one_repeated_token(tmp_path, heads, kv_heads, head_dim, tied):
    path = write_random_qwen3(tmp_path, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("Once upon a time there was", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    new = out[0, ids.shape[1]:].tolist()
    assert len(set(new)) > 3, new
    assert torch.isfinite(logits).all()
    top2 = logits[0].topk(2, dim=-1).values
    assert (top2[:, 0] > top2[:, 1]).all()  # no exact ties for argmax
    assert 1 < logits.std().item() < 10


def test_tied_embeddings_show_in_config_and_tensors(tmp_path):
    untied = write_random_qwen3(tmp_path / "untied", with_tokenizer=False)
    tied = write_random_qwen3(tmp_path / "tied", with_tokenizer=False, tie_word_embeddings=True)
    assert json.loads((untied / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" in tensor_names(untied)
    assert "lm_head.weight" not in tensor_names(tied)
    assert "model.embed_tokens.weight" in tensor_names(tied)
    model = transformers.AutoModelForCausalLM.from_pretrained(tied)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_seeded_and_shaped(tmp_path):
    kw = dict(with_tokenizer=False, num_heads=4, num_kv_heads=1, head_dim=64)
    a = read_tensors(write_random_qwen3(tmp_path / "a", seed=3, **kw))
    b = read_tensors(write_random_qwen3(tmp_path / "b", seed=3, **kw))
    c = read_tensors(write_random_qwen3(tmp_path / "c", seed=4, **kw))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    assert a["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 64, 64)
    assert a["model.layers.0.self_attn.k_proj.weight"].shape == (1 * 64, 64)
    assert a["model.layers.0.self_attn.q_norm.weight"].shape == (64,)
    assert not torch.equal(a["model.norm.weight"], torch.ones(64))  # norm weights are not all ones


def test_dtype(tmp_path):
    path = write_random_qwen3(tmp_path, with_tokenizer=False, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(path).values())
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


def test_default_checkpoint_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = default_checkpoint()
    assert first.parent == tmp_path / "minivllm" and first.name.startswith("tiny-qwen3-")
    assert (first / "tokenizer.json").is_file()
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("default_checkpoint rebuilt a cached checkpoint")

    monkeypatch.setattr(rc, "write_random_qwen3", no_rebuild)
    assert default_checkpoint() == first
    assert weights.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "minivllm").iterdir()] == [first.name]  # no temp dirs left


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
