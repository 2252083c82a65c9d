"""Bad input to the engine raises ValueError naming what is wrong; sampling filters do what they say."""

import dataclasses
import json
import re
import types

import pytest
import torch

from minivllm.engine import LLM, SamplingParams, sampler
from minivllm.engine.backend import TORCH, TRITON, Backend
from minivllm.engine.checkpoint_config import load_generation_defaults
from minivllm.engine.config import Config
from minivllm.engine.sampler import sample
from minivllm.reference import filter_probs_ref
from minivllm.testing.random_checkpoint import write_random_qwen3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("tiny"), with_tokenizer=False)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), max_model_len=32, max_num_batched_tokens=64, device="cpu", attention_backend="torch")


@pytest.mark.parametrize(
    "prompt, match",
    [
        (list(range(32)), "max_model_len"),
        ([], "empty"),
        ([1, 2, 10_000], "token ids"),
        ("text needs a tokenizer", "tokenizer"),
    ],
)
def test_bad_prompts_raise_before_any_work(llm, prompt, match):
    good = [1, 2, 3]
    with pytest.raises(ValueError, match=match):
        llm.generate([good, prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.scheduler.is_finished()  # the good prompt was not left queued


class ByteTokenizer:
    """A stand-in tokenizer: UTF-8 bytes as token ids, within the random checkpoint's 256."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


def outputs(outs: list[dict]) -> list[tuple]:
    """generate()'s outputs without their timings, which differ run to run."""
    return [(o["text"], o["token_ids"]) for o in outs]


def test_a_single_prompt_gets_a_list_of_one(llm, monkeypatch):
    """As in vLLM, a str or one list of token ids is one prompt, not a batch of characters or ints."""
    monkeypatch.setattr(llm, "tokenizer", ByteTokenizer())
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    def generate(prompts, params=greedy):
        return outputs(llm.generate(prompts, params, use_tqdm=False))

    batch = generate([list(b"hello"), [1, 2, 3]])
    assert generate("hello") == batch[:1]
    assert generate([1, 2, 3]) == batch[1:]
    assert generate((1, 2, 3), [greedy]) == batch[1:]
    assert generate(["hello", (1, 2, 3)]) == batch
    assert generate([]) == []


@pytest.mark.parametrize(
    "prompts, match",
    [
        (5, "prompts must be a str, a list of token ids, or a list of those, got int"),
        ({"prompt": "hi"}, "prompts must be .* got dict"),
        (torch.tensor([1, 2]), "prompts must be .* got Tensor"),
        ([[1, 2], 3], r"prompts\[1\]: expected a str or a list of token ids, got int \(a list mixing"),
        ([[1, 2], None], r"prompts\[1\]: expected a str or a list of token ids, got NoneType"),
        ([1, True, 3], r"prompts\[0\]: token ids must be ints in \[0, 256\), got True at position 1"),
        ([1, 2.0], "got 2.0 at position 1"),
        ([[4], [-1]], r"prompts\[1\]: token ids .* got -1 at position 0"),
        ([256], "got 256"),
        ([[1], []], r"prompts\[1\]: the prompt is empty"),
        ([[1], ""], r"prompts\[1\]: the prompt is empty"),
    ],
)
def test_bad_prompts_name_the_prompt_and_what_was_expected(llm, monkeypatch, prompts, match):
    monkeypatch.setattr(llm, "tokenizer", ByteTokenizer())
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.scheduler.is_finished()


class WideTokenizer(ByteTokenizer):
    """A tokenizer that does not match the checkpoint: its ids run past the model's 256."""

    def encode(self, text: str) -> list[int]:
        return [b + 200 for b in text.encode()]


def test_a_tokenizer_id_past_the_vocabulary_is_refused(llm, monkeypatch):
    """It once reached the embedding and died there with an IndexError (on a GPU, a device assert)."""
    monkeypatch.setattr(llm, "tokenizer", WideTokenizer())
    match = r"prompts\[1\]: the tokenizer encoded it with id 304 at position 0, outside the model's vocabulary \[0, 256\)"
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2], "hi"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.scheduler.is_finished()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=True), "max_tokens must be an int >= 1, got True"),
        (dict(max_tokens=8.0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature"),
        # Finite in Python but inf in the device's float32.
        (dict(temperature=1e300), r"temperature must be a finite number >= 0 .*float32.*, got 1e\+300"),
        (dict(temperature=3.5e38), "temperature must be a finite number >= 0"),
        (dict(temperature=True), "temperature"),
        (dict(temperature="0.5"), "temperature"),
        (dict(ignore_eos="no"), "ignore_eos must be True or False, got 'no'"),
        (dict(ignore_eos=1), "ignore_eos"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=True), "top_p"),
        (dict(top_p="0.9"), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=-0.1), r"min_p must be a number in \[0, 1\]"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=True), "min_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(min_p="0.1"), "min_p"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_cannot_change_after_their_checks():
    """A field set after construction would reach the device unchecked (temperature 1e300 became
    inf there): a request's parameters are fixed once checked; dataclasses.replace checks anew."""
    params = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1e300
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(params, temperature=1e300)
    assert dataclasses.replace(params, top_k=3).top_k == 3


def test_good_sampling_params_are_kept():
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, top_k=5, top_p=1)
    assert (params.temperature, params.max_tokens, params.ignore_eos, params.top_k, params.top_p) == (0, 1, True, 5, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kvcache_block_size=24), "power of two"),
        (dict(kvcache_block_size=512), "power of two"),
        (dict(long_prefill_token_threshold=0), "long_prefill_token_threshold"),
        (dict(async_scheduling="yes"), "async_scheduling"),
        (dict(attention_backend="cuda"), "attention_backend"),
        (dict(dtype="float64"), "dtype"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size"),
        (dict(tensor_parallel_size=2.0), "tensor_parallel_size"),
        (dict(num_kvcache_blocks=0), "num_kvcache_blocks"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Config("unused", **kwargs)


# Every Config option by the kind of value it takes; device and dtype have tests of their own.
INT_OPTIONS = ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "cpu_kvcache_bytes", "kvcache_block_size", "num_kvcache_blocks",
               "tensor_parallel_size", "long_prefill_token_threshold")
FLAG_OPTIONS = ("enforce_eager", "async_scheduling", "cascade_attention")


def test_every_config_option_is_checked_here():
    checked = {"model", "device", "dtype", "gpu_memory_utilization", "attention_backend", *INT_OPTIONS, *FLAG_OPTIONS}
    assert {f.name for f in dataclasses.fields(Config)} == checked


@pytest.mark.parametrize("name", INT_OPTIONS)
@pytest.mark.parametrize("value", [True, False, "16", 16.0, [16]], ids=repr)
def test_an_int_option_refuses_other_types(name, value):
    """True is no count of 1, and a string or a float would fail deep inside torch, if at all."""
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        Config("unused", attention_backend="torch", **{name: value})


@pytest.mark.parametrize("name", FLAG_OPTIONS)
@pytest.mark.parametrize("value", ["no", 1, None], ids=repr)
def test_a_flag_option_refuses_anything_but_a_bool(name, value):
    """A string such as "no" is truthy: taking it as True would silently do the opposite."""
    with pytest.raises(ValueError, match=rf"^{name} must be a bool, got {re.escape(repr(value))}"):
        Config("unused", attention_backend="torch", **{name: value})


@pytest.mark.parametrize("value", [True, "0.5", float("nan"), float("inf"), 0, 1.5, None, [0.5]], ids=repr)
def test_gpu_memory_utilization_must_be_a_fraction(value):
    with pytest.raises(ValueError, match=rf"^gpu_memory_utilization must be a number in \(0, 1\], got {re.escape(repr(value))}"):
        Config("unused", attention_backend="torch", gpu_memory_utilization=value)


@pytest.mark.parametrize("value", [["torch"], None, 5], ids=repr)
def test_attention_backend_must_be_a_backend_name(value):
    with pytest.raises(ValueError, match=r"^attention_backend must be one of \['torch', 'triton'\]"):
        Config("unused", attention_backend=value)


@pytest.mark.parametrize("value", [5, None, b"ckpt"], ids=repr)
def test_model_must_be_a_path(value):
    with pytest.raises(ValueError, match="^model must be a checkpoint directory's path"):
        Config(value, attention_backend="torch")


def test_good_config_values_are_kept(tmp_path):
    config = Config(tmp_path, attention_backend="torch", gpu_memory_utilization=1, cpu_kvcache_bytes=1 << 20, enforce_eager=True)
    assert (config.model, config.gpu_memory_utilization, config.cpu_kvcache_bytes, config.enforce_eager) == (str(tmp_path), 1, 1 << 20, True)


def test_max_model_len_past_the_checkpoints_positions_raises(checkpoint):
    """The rotary table of a checkpoint covers max_position_embeddings (2048 in the tiny one);
    a longer max_model_len, though the token budget no longer bounds it, would run past it."""
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) exceeds the checkpoint's max_position_embeddings \(2048\)"):
        LLM(str(checkpoint), max_model_len=4096, max_num_batched_tokens=64, device="cpu", attention_backend="torch")


MISSING_GPU = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine


@pytest.mark.parametrize(
    "device, match",
    [
        (MISSING_GPU, rf"device '{MISSING_GPU}' does not exist: this machine has {torch.cuda.device_count()} CUDA devices"),
        ("gpu0", "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
        ("cuda:-1", "device must be"),
        ("", "device must be"),
        ("meta", "device 'meta' is not supported"),
        (0, "device must be a str"),
    ]
    + ([("cuda", "device 'cuda' does not exist: this machine has 0 CUDA devices")] if not torch.cuda.is_available() else []),
)
def test_a_device_the_machine_lacks_is_refused(device, match):
    with pytest.raises(ValueError, match=match):
        Config("unused", device=device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "fp16", "torch.float16", 16])
def test_a_dtype_the_kernels_do_not_take_is_refused(dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        Config("unused", dtype=dtype)


def test_the_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    """Compiled kernels cannot take CPU tensors: refused when the engine is configured, naming
    the way out, not at the first launch inside generate."""
    import minivllm.engine.config as config_module

    monkeypatch.setattr(config_module, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"attention_backend 'triton' on device 'cpu' needs Triton's interpreter.*interpret_without_gpu"):
        Config("unused", device="cpu", attention_backend="triton")
    assert Config("unused", device="cpu", attention_backend="torch").attention_backend == "torch"


def test_supported_devices_and_dtypes_are_accepted():
    # The torch backend: on a GPU machine the triton one on the CPU is refused (kernels compiled).
    assert Config("unused", device=torch.device("cpu"), dtype=torch.bfloat16, attention_backend="torch").dtype == torch.bfloat16
    assert Config("unused", device="cpu", dtype="float16", attention_backend="torch").device == torch.device("cpu")
    assert Config("unused", dtype=None).dtype is None


def test_llm_refuses_a_bad_device_or_dtype_before_loading(checkpoint):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(checkpoint), device=MISSING_GPU)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(str(checkpoint), device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("option", ["--max-tokens", "--max-model-len", "--tensor-parallel-size"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_main_refuses_counts_below_one(option, value, capsys):
    """0 is not "unset": `--max-tokens 0` once ran with 16."""
    import main

    with pytest.raises(SystemExit) as exc:
        main.parse_args([option, value])
    assert exc.value.code == 2 and f"{option}: expected an int >= 1, got '{value}'" in capsys.readouterr().err


def test_main_refuses_bad_sampling_options_before_loading(monkeypatch):
    import main
    from minivllm.testing import random_checkpoint

    monkeypatch.setattr(random_checkpoint, "default_checkpoint", lambda: pytest.fail("built a checkpoint for a refused run"))
    with pytest.raises(ValueError, match="temperature"):
        main.main(["--temperature", "inf"])
    assert main.parse_args(["--max-tokens", "3"]).max_tokens == 3


def test_cache_that_cannot_hold_one_sequence_is_refused(checkpoint):
    with pytest.raises(ValueError, match="cannot hold one"):
        LLM(str(checkpoint), max_model_len=64, max_num_batched_tokens=64, kvcache_block_size=16, num_kvcache_blocks=3, device="cpu", attention_backend="torch")


def test_unknown_config_key_is_refused(checkpoint):
    with pytest.raises(ValueError, match="max_batch_size"):
        LLM(str(checkpoint), max_batch_size=4)


def test_missing_or_foreign_checkpoints_are_refused(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="not a directory"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))
    llama = tmp_path / "llama"
    llama.mkdir()
    config = json.loads((checkpoint / "config.json").read_text()) | {"model_type": "llama"}
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'llama'"):
        LLM(str(llama))


def test_eos_stops_a_sequence_unless_ignored(checkpoint):
    llm = LLM(str(checkpoint), max_model_len=64, max_num_batched_tokens=64, device="cpu", attention_backend="torch")
    prompt = [5, 6, 7]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]["token_ids"]
    llm.eos_token_ids = {free[3]}  # pretend the 4th greedy token is end-of-sequence
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]["token_ids"]
    assert stopped == free[: free.index(free[3]) + 1]
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]["token_ids"] == free


def test_packed_decode_inputs(llm):
    """One packed buffer carries a decode step: each row's position is its length - 1 and its slot
    the block table's entry for that position, across block edges; padding rows up to the graph's
    size read nothing (context 0) and write nowhere (slot -1)."""
    from minivllm.engine.sequence import Sequence

    block = llm.config.kvcache_block_size
    lens = [5, block, block + 1, 2 * block - 1]
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randperm(llm.config.num_kvcache_blocks, generator=gen).tolist()
    seqs = []
    for i, n in enumerate(lens):
        seq = Sequence(torch.randint(0, 256, (n,), generator=gen).tolist(), SamplingParams(), block)
        seq.block_table = blocks[2 * i : 2 * i + -(-n // block)]
        seqs.append(seq)
    rows = len(seqs) + 3
    packed = llm.runner.pack_decode(seqs, [n - 1 for n in lens], rows)
    ids, positions, meta = llm.runner.decode_inputs(packed, rows, max(lens))
    pad = [0] * 3
    assert ids.tolist() == [s.token_ids[-1] for s in seqs] + pad
    assert meta.context_lens.tolist() == lens + pad
    assert positions[: len(seqs)].tolist() == [n - 1 for n in lens]
    want = [s.block_table[(n - 1) // block] * block + (n - 1) % block for s, n in zip(seqs, lens, strict=True)]
    assert meta.slot_mapping.tolist() == want + [-1] * 3
    width = meta.block_tables.shape[1]
    assert meta.block_tables.tolist() == [s.block_table + [-1] * (width - len(s.block_table)) for s in seqs] + [[-1] * width] * 3


def test_a_mixed_step_puts_its_one_token_rows_first(llm):
    """A prefill step's rows of one new token (a decode riding along, a one-token chunk) come
    first and attend as decode rows; the chunks follow with their own cu_seqlens; the rows to
    sample stay in step order."""
    from minivllm.engine.scheduler import ScheduledStep
    from minivllm.engine.sequence import Sequence

    block = llm.config.kvcache_block_size
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randperm(llm.config.num_kvcache_blocks, generator=gen).tolist()
    # (length, computed before the step, new tokens): a chunk after a prefix, a decode row past a
    # block edge, a whole prompt, a decode row in its first block.
    rows = [(block + 9, 3, block + 6), (block + 2, block + 1, 1), (7, 0, 7), (5, 4, 1)]
    step = ScheduledStep()
    for i, (n, done, new) in enumerate(rows):
        seq = Sequence(torch.randint(0, 256, (n,), generator=gen).tolist(), SamplingParams(), block)
        seq.block_table = blocks[3 * i : 3 * i + -(-n // block)]
        seq.num_computed_tokens = done
        step.add(seq, new)
    ids, positions, meta, last = llm.runner.prepare_chunks(step)
    order = [1, 3, 0, 2]
    assert ids.tolist() == [t for i in order for t in step.seqs[i].token_ids[step.starts[i] : step.starts[i] + step.num_new[i]]]
    assert positions.tolist() == [p for i in order for p in range(step.starts[i], step.starts[i] + step.num_new[i])]
    assert meta.decode_rows == 2 and meta.context_lens.tolist() == [block + 2, 5]
    assert meta.max_context_len == llm.config.max_model_len
    width = meta.decode_block_tables.shape[1]
    assert meta.decode_block_tables.tolist() == [step.seqs[i].block_table + [-1] * (width - len(step.seqs[i].block_table)) for i in (1, 3)]
    assert meta.cu_seqlens_q.tolist() == [0, block + 6, block + 13] and meta.cu_seqlens_k.tolist() == [0, block + 9, block + 16]
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (block + 6, block + 9)
    assert meta.block_tables.tolist() == [step.seqs[i].block_table + [-1] * (width - len(step.seqs[i].block_table)) for i in (0, 2)]
    # Every row reaches its sequence's end, so each samples its last token, in step order.
    assert last.tolist() == [2 + block + 6 - 1, 0, 2 + block + 13 - 1, 1]


def test_decode_steps_run_their_longest_contexts_first(llm, monkeypatch):
    """Every decode step reaches the device with its rows in descending context order (the
    attention grid then starts its longest programs first), and each prompt still gets the
    tokens it gets alone."""
    prompts = [[7] * 3, [8] * 12, [9] * 6, [10] * 17, [11] * 1]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [llm.generate(p, params, use_tqdm=False)[0]["token_ids"] for p in prompts]
    orders = []
    pack = llm.runner.pack_decode
    monkeypatch.setattr(llm.runner, "pack_decode", lambda seqs, positions, rows: orders.append(list(positions)) or pack(seqs, positions, rows))
    together = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert together == alone
    assert orders and all(p == sorted(p, reverse=True) for p in orders)
    assert any(len(set(p)) > 1 for p in orders)


DRAWS = 1000  # rows of one call; at p = 0.84 a frequency's standard deviation is 0.012


def sampler_generator(seed: int, backend: Backend, device: torch.device) -> torch.Generator:
    """The triton backend draws its kernel's seed on the host; the torch backend draws its noise
    on the logits' device."""
    return torch.Generator(device if backend is TORCH else "cpu").manual_seed(seed)


@pytest.mark.parametrize("backend", [TRITON, TORCH], ids=lambda b: b.name)
def test_sampler_filters(backend, device):
    gen = sampler_generator(0, backend, device)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], device=device).repeat(DRAWS, 1)
    ones = torch.ones(DRAWS, device=device)
    no_k = torch.zeros(DRAWS, dtype=torch.long, device=device)
    draws = sample(logits, ones, no_k, ones, gen, backend)
    freq = torch.bincount(draws, minlength=4).float() / DRAWS
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.05)  # plain temperature-1 sampling
    top2 = sample(logits, ones, torch.full((DRAWS,), 2, device=device), ones, gen, backend)
    assert set(top2.tolist()) == {0, 1}
    # p = 0.6: token 0 holds ~0.61 of the mass, so it alone is kept.
    assert set(sample(logits, ones, no_k, torch.full((DRAWS,), 0.6, device=device), gen, backend).tolist()) == {0}
    signs = torch.tensor([[1.0], [-1.0]], device=device)
    greedy = sample(logits[:2] * signs, torch.zeros(2, device=device), no_k[:2], ones[:2], gen, backend)
    assert greedy.tolist() == [0, 3]


@pytest.mark.parametrize("backend", [TRITON, TORCH], ids=lambda b: b.name)
def test_filters_rank_tokens_whatever_the_temperature(backend, device):
    """A temperature float32 holds but that scales the logits' differences below its resolution
    ties them: ranked after scaling, top_k=1 kept whichever of the tied tokens sorted first, not
    the argmax, and top-p cut the wrong tokens. Ranked on the logits, top_k=1 is greedy at any
    temperature, and top-p keeps the highest logits."""
    gen = sampler_generator(2, backend, device)
    logits = (0.5 - 1e-7 * torch.arange(64, device=device)).repeat(4, 1)  # descending: token 0 is the argmax
    temps = torch.tensor([3e38, 3e38, 1e30, 1.0], device=device)
    top1 = sample(logits, temps, torch.ones(4, dtype=torch.long, device=device), None, gen, backend)
    assert top1.tolist() == [0] * 4
    # At so high a temperature the distribution is uniform: top_p 0.1 keeps the 7 highest logits.
    kept = sample(logits[:1].repeat(DRAWS, 1), temps[:1].repeat(DRAWS), None, torch.full((DRAWS,), 0.1, device=device), gen, backend)
    assert set(kept.tolist()) == set(range(7))


# Upper 0.1% points of the chi-square distribution by degrees of freedom (1 to 7): a right
# sampler fails a case with probability 0.001; the seeds are fixed, so the test is deterministic.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
LOGITS8 = [3.0, 2.2, 1.9, 1.0, 0.4, 0.0, -0.5, -1.5]
# (temperature, top_k, top_p, min_p) per case; each is one block of CHI2_DRAWS rows of one batch.
FILTER_CASES = [(0.6, 5, 0.95, 0.0), (1.3, 0, 0.8, 0.0), (1.3, 0, 0.5, 0.0), (1.0, 0, 1.0, 0.1), (2.0, 3, 0.9, 0.3), (0.8, 0, 1.0, 0.0)]
CHI2_DRAWS = 2000


def chi_square_fits(draws: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether int64 `draws` fit fp64 `probs` (vocab,): no draw of a token of probability 0, and
    Pearson's statistic below CHI2_999 at (tokens of nonzero probability - 1) degrees of freedom."""
    seen = torch.bincount(draws.cpu(), minlength=len(probs)).double()
    live = probs > 0
    if seen[~live].any():
        return False
    want = probs[live] * len(draws)
    return int(live.sum()) == 1 or float(((seen[live] - want) ** 2 / want).sum()) < CHI2_999[int(live.sum()) - 1]


def filter_case_draws(backend: Backend, device, monkeypatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(cases, CHI2_DRAWS) draws from one batch holding every FILTER_CASES row, its logits LOGITS8
    in `dtype`. Two candidates only, so the top-p rows without top-k take both paths: p = 0.5 is
    covered by them, 0.8 is not."""
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 2)

    def rows(i: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([c[i] for c in FILTER_CASES], dtype=dtype, device=device).repeat_interleave(CHI2_DRAWS)

    logits = torch.tensor(LOGITS8, device=device).to(dtype).repeat(len(FILTER_CASES) * CHI2_DRAWS, 1)
    gen = sampler_generator(3, backend, device)
    draws = sample(logits, rows(0, torch.float32), rows(1, torch.long), rows(2, torch.float32), gen, backend, min_ps=rows(3, torch.float32))
    return draws.view(len(FILTER_CASES), CHI2_DRAWS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [TRITON, TORCH], ids=lambda b: b.name)
def test_filtered_draws_follow_the_sort_based_distribution(backend, dtype, device, monkeypatch):
    """Every case's draws fit filter_probs_ref's distribution over the logits as given (bf16 ones
    are ranked, cut and drawn from without an fp32 copy), and not that of a filter taking top-p's
    mass before the temperature (at 1.0), which keeps other tokens in case 0."""
    draws = filter_case_draws(backend, device, monkeypatch, dtype)
    logits = torch.tensor(LOGITS8).to(dtype).float()
    for case, (t, k, p, m) in zip(draws, FILTER_CASES, strict=True):
        assert chi_square_fits(case, filter_probs_ref(logits, t, k, p, m)), (t, k, p, m)
    t, k, p, m = FILTER_CASES[0]
    wrong = filter_probs_ref(logits, 1.0, k, p, m)  # the kept set at temperature 1 ...
    wrong = torch.where(wrong > 0, filter_probs_ref(logits, t, k), 0)  # ... drawn from at t
    assert not chi_square_fits(draws[0], wrong / wrong.sum())


@pytest.mark.parametrize("backend", [TRITON, TORCH], ids=lambda b: b.name)
@pytest.mark.parametrize("one", [dict(top_ks=1), dict(top_ps=1e-6), dict(min_ps=1.0)], ids=lambda d: next(iter(d)))
def test_a_filter_leaving_one_token_is_greedy(backend, device, one):
    gen = sampler_generator(4, backend, device)
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(4)).to(device)
    (name, value), = one.items()
    tensor = torch.full((64,), value, dtype=torch.long if name == "top_ks" else torch.float32, device=device)
    assert torch.equal(sample(logits, torch.full((64,), 1.5, device=device), generator=gen, backend=backend, **{name: tensor}), logits.argmax(-1))


@pytest.mark.parametrize("case", ["top_k", "top_p", "min_p"])
def test_filters_never_sort_the_vocabulary(device, monkeypatch, case):
    """torch.topk over the few candidates, not a sort over the vocabulary (which at Qwen3's
    151,936 tokens took about as long as a decode step); a top-p row without top-k too, once
    its candidates hold its mass."""
    def no_sort(*args, **kwargs):
        raise AssertionError("the filters sorted the vocabulary")

    monkeypatch.setattr(torch, "sort", no_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "argsort", no_sort)
    monkeypatch.setattr(torch.Tensor, "argsort", no_sort)
    logits = torch.randn(4, 4096, generator=torch.Generator().manual_seed(5)).to(device)
    filters = {
        "top_k": dict(top_ks=torch.full((4,), 20, device=device)),
        "top_p": dict(top_ps=torch.full((4,), 0.5, device=device)),
        "min_p": dict(min_ps=torch.full((4,), 0.5, device=device)),
    }[case]
    sample(logits, torch.ones(4, device=device), generator=sampler_generator(5, TORCH, device), backend=TORCH, **filters)


def test_a_top_k_past_int64_is_off(llm):
    """top_k beyond the vocabulary keeps every token, as 0 does, however large: the device's
    int64 cannot hold 2**70, which once failed inside torch."""
    prompt = [1, 2, 3]
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]["token_ids"]
    for top_k in (256, 2**63, 2**70):
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, top_k=top_k)
        assert llm.generate(prompt, params, use_tqdm=False)[0]["token_ids"] == want


def test_a_kv_cache_past_int32_slots_is_refused(llm, monkeypatch):
    """Cache slots (block * block_size + offset) reach the device as int32: a larger cache would
    wrap them and write KV over other tokens'. An explicit size is refused, one sized from
    memory is capped."""
    with pytest.raises(ValueError, match=r"num_kvcache_blocks \(134217729\) of 16 tokens .* int32"):
        Config("unused", attention_backend="torch", kvcache_block_size=16, num_kvcache_blocks=2**27 + 1)
    assert Config("unused", attention_backend="torch", kvcache_block_size=16, num_kvcache_blocks=2**27).num_kvcache_blocks == 2**27
    monkeypatch.setattr(llm.config, "cpu_kvcache_bytes", 1 << 60)
    assert llm.runner._blocks_that_fit() == 2**31 // llm.config.kvcache_block_size


@pytest.mark.parametrize("backend", [TRITON, TORCH], ids=lambda b: b.name)
def test_sampler_paths_without_filters(backend, device):
    """No filter tensors: no sort, the same distribution; no temperatures: argmax; a greedy row
    beside sampled rows stays argmax."""
    gen = sampler_generator(1, backend, device)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], device=device).repeat(DRAWS, 1)
    half = torch.full((DRAWS,), 0.5, device=device)
    freq = torch.bincount(sample(logits, half, generator=gen, backend=backend), minlength=4).float() / DRAWS
    assert torch.allclose(freq, (logits[0] / 0.5).softmax(-1), atol=0.05)
    signs = torch.tensor([[1.0], [-1.0], [1.0]], device=device)
    assert sample(logits[:3] * signs, None, backend=backend).tolist() == [0, 3, 0]
    temps = torch.cat([torch.zeros(1, device=device), torch.ones(199, device=device)])
    mixed = sample(-logits[:200], temps, generator=gen, backend=backend)
    assert mixed[0] == 3 and len(set(mixed[1:].tolist())) == 4


def test_sharded_checkpoint_and_text_prompts(tmp_path):
    """Weights split over several safetensors files load the same; text prompts go through the
    checkpoint's tokenizer and come back as text; stop ids from generation_config.json count."""
    whole = write_random_qwen3(tmp_path / "whole", seed=3, device="cpu")
    sharded = write_random_qwen3(tmp_path / "sharded", seed=3, device="cpu", max_shard_bytes=100_000)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = [
        LLM(str(d), max_model_len=64, max_num_batched_tokens=64, device="cpu", attention_backend="torch").generate(
            ["The moon", "Hello there"], params, use_tqdm=False
        )
        for d in (whole, sharded)
    ]
    assert outputs(outs[0]) == outputs(outs[1])
    generation = json.loads((sharded / "generation_config.json").read_text())
    (sharded / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": [0, 7]}))
    llm = LLM(str(sharded), max_model_len=64, max_num_batched_tokens=64, device="cpu", attention_backend="torch")
    assert outs[1][0]["text"] == llm.tokenizer.decode(outs[1][0]["token_ids"], skip_special_tokens=True)
    assert {llm.tokenizer.eos_token_id, 7} <= llm.eos_token_ids


QWEN3_GENERATION_CONFIG = {
    "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
    "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0",
}


def test_qwen3_generation_config_gives_the_sampling_defaults(tmp_path):
    """Qwen3's own generation_config.json, as shipped: its temperature, top_k and top_p."""
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN3_GENERATION_CONFIG))
    assert load_generation_defaults(tmp_path) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert load_generation_defaults(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("key, value", [("min_p", 2.0), ("top_k", -1), ("temperature", "0.7"), ("top_p", True)])
def test_bad_generation_config_sampling_values_are_named(tmp_path, key, value):
    file = tmp_path / "generation_config.json"
    file.write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: '{key}': {key} must be"):
        load_generation_defaults(tmp_path)


def test_unset_fields_come_from_the_checkpoint_and_explicit_ones_win(tmp_path):
    ckpt = write_random_qwen3(tmp_path, with_tokenizer=False)
    generation = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps(generation | {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.05}))
    llm = LLM(str(ckpt), max_model_len=32, max_num_batched_tokens=64, device="cpu", attention_backend="torch")
    seq = llm._sequence([1, 2, 3], SamplingParams(max_tokens=2))
    assert (seq.temperature, seq.top_k, seq.top_p, seq.min_p) == (0.6, 20, 0.95, 0.05)
    seq = llm._sequence([1, 2, 3], SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=0.0))
    assert (seq.temperature, seq.top_k, seq.top_p, seq.min_p) == (0, 0, 1.0, 0.0)
    # Greedy with the checkpoint's filters left on picks the argmax all the same.
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    plain = dataclasses.replace(greedy, top_k=0, top_p=1.0, min_p=0.0)
    assert llm.generate([1, 2, 3], greedy, use_tqdm=False)[0]["token_ids"] == llm.generate([1, 2, 3], plain, use_tqdm=False)[0]["token_ids"]


def test_unset_fields_without_a_generation_config_take_the_library_defaults():
    assert SamplingParams().resolve({}) == SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert SamplingParams(top_k=3).resolve({"top_k": 20, "top_p": 0.9}) == SamplingParams(temperature=1.0, top_k=3, top_p=0.9, min_p=0.0)


def test_shared_tokens_counts_the_leading_blocks_every_row_holds():
    """The cascade's shared length: leading block ids equal in every row, never a -1 pad, and only
    blocks that every row filled before this step (below the block its position writes)."""
    import numpy as np

    from minivllm.engine.model_runner import ModelRunner

    runner = types.SimpleNamespace(block_size=4)
    tables = np.array([[7, 3, 9, 1], [7, 3, 9, 5], [7, 3, 2, -1]])
    assert ModelRunner.shared_tokens(runner, tables, [15, 14, 11]) == 8  # blocks 7, 3
    assert ModelRunner.shared_tokens(runner, tables, [15, 14, 7]) == 4  # row 2 writes into block 3
    assert ModelRunner.shared_tokens(runner, tables[:2], [15, 14]) == 12  # blocks 7, 3, 9
    assert ModelRunner.shared_tokens(runner, np.array([[7, -1], [7, -1]]), [3, 3]) == 0  # both still write block 7
    assert ModelRunner.shared_tokens(runner, np.array([[6, 3], [7, 3]]), [7, 7]) == 0  # differ at the first block
    assert ModelRunner.shared_tokens(runner, tables[:1], [15]) == 0  # one row shares with no one
