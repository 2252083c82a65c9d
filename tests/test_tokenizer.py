"""The engine's own tokenizer (minivllm/engine/tokenizer.py) against transformers: the same token
ids and text, the same chat prompts from Qwen3's real chat template, the same refusals, and an
engine that serves text prompts without importing transformers at all."""

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import pytest

from minivllm.engine.tokenizer import Tokenizer
from minivllm.testing.random_checkpoint import write_random_qwen3

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
# Qwen3's chat template as its tokenizer_config.json holds it (thinking, tools, tool responses).
QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")

TEXTS = [
    "",
    "Hello, my name is",
    "héllo wörld ✓ — 日本語のテキスト 🤖🚀 ümlaut Ω≈ç√",
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|><|im_start|>",
    "a  b   c\t\td\n\n\n   e \r\n  \u00a0 \u3000 f    ",
    "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_qwen3(tmp_path_factory.mktemp("tok"), num_layers=1)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def ours(checkpoint) -> Tokenizer:
    return Tokenizer(checkpoint)


def tokenizer_dir(path: Path, checkpoint: Path, config: dict | None = None, template: str | None = None) -> Path:
    """`path` holding the checkpoint's tokenizer.json, plus a tokenizer_config.json holding `config`
    and a chat_template.jinja holding `template` when they are given."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_bytes((checkpoint / "tokenizer.json").read_bytes())
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if template is not None:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(hf, ours, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert ours.decode(ids) == ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_encode_as_one_id_and_are_skipped(hf, ours):
    ids = ours.encode("a<|im_end|>b")
    assert hf.convert_tokens_to_ids("<|im_end|>") in ids
    assert ours.decode(ids) == "ab"
    assert ours.eos_token_id == hf.eos_token_id is not None
    assert len(ours) == len(hf)


def test_config_forms(tmp_path, checkpoint):
    """eos_token as an AddedToken dict, a list of named chat templates (the "default" one
    counts), and chat_template.jinja taking precedence over the config's template, as in transformers."""
    added = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    listed = Tokenizer(tokenizer_dir(tmp_path / "listed", checkpoint, {"eos_token": added, "chat_template": named}))
    assert listed.eos_token_id == 2 and listed.special_tokens == {"eos_token": "<|im_end|>"}
    assert listed.chat_template == "default"
    both = tokenizer_dir(tmp_path / "both", checkpoint, {"eos_token": "<|endoftext|>", "chat_template": "config"}, template="file")
    assert Tokenizer(both).chat_template == transformers.AutoTokenizer.from_pretrained(both).chat_template == "file"
    bare = Tokenizer(tokenizer_dir(tmp_path / "bare", checkpoint))
    assert bare.eos_token_id is None and bare.chat_template is None and bare.special_tokens == {}


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city — «quoted» & <escaped>?",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": {"type": "object", "properties": {}}}},
]

CONVERSATIONS = {
    "system and think tags": (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello."},
            {"role": "user", "content": "Et maintenant, ça va? 🙂"},
            {"role": "assistant", "content": "<think>\nFrench now.\n</think>\n\nOui, ça va."},
        ],
        None,
    ),
    "reasoning_content": (
        [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4"},
            {"role": "user", "content": "And three plus three?"},
        ],
        None,
    ),
    "tool calls": (
        [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Weather and time in Paris?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
                    {"type": "function", "function": {"name": "get_time", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": '{"temperature": 21}'},
            {"role": "tool", "content": "14:05"},
            {"role": "assistant", "content": "<think>\nI have both.\n</think>\n\nIt is 21 °C at 14:05."},
        ],
        TOOLS,
    ),
    "tools without a system turn": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
            {"role": "tool", "content": "rain"},
        ],
        TOOLS,
    ),
}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, checkpoint) -> Tokenizer:
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    return Tokenizer(tokenizer_dir(tmp_path_factory.mktemp("qwen3"), checkpoint, config, QWEN3_TEMPLATE))


@pytest.mark.parametrize("thinking", [None, True, False], ids=["thinking unset", "enable_thinking", "disable_thinking"])
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no prompt", "generation prompt"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_qwen3_chat_template_matches_transformers(hf, qwen3, name, add_generation_prompt, thinking):
    messages, tools = CONVERSATIONS[name]
    extra = {} if thinking is None else {"enable_thinking": thinking}
    expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, chat_template=QWEN3_TEMPLATE, tokenize=False, **extra)
    assert qwen3.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra) == expected
    # Not vacuous: the options reach the template (enable_thinking=False closes an empty think block).
    empty_thinking = "<think>\n\n</think>\n\n" if thinking is False else ""
    assert expected.endswith(f"<|im_start|>assistant\n{empty_thinking}" if add_generation_prompt else "<|im_end|>\n")


def test_qwen3_renders_what_qwen3_expects(qwen3):
    """Guards the template file itself: an escape lost in copying it would render differently here
    and in transformers alike, so the comparison above would not see it."""
    messages, tools = CONVERSATIONS["tool calls"]
    text = qwen3.apply_chat_template(messages, tools=tools)
    assert text.startswith("<|im_start|>system\nUse the tools.\n\n# Tools\n\nYou may call one or more functions")
    assert '\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' in text
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text  # tojson keeps non-ASCII and <, >, & as they are
    assert ('<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n') in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response>\n<tool_response>\n14:05\n</tool_response><|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n<think>\nI have both.\n</think>\n\nIt is 21 °C at 14:05.<|im_end|>\n")


TEMPLATE_FEATURES = """\
{%- for m in messages %}
  {%- if m.role == 'stop' %}{% break %}{% endif %}
  [{{ m.role }}|{{ m.content }}|{{ m.extra is defined }}]
{%- endfor %}
{{ bos_token }}{{ eos_token }}{{ pad_token }}{{ unk_token is defined }}
{{ tools | tojson(indent=2, sort_keys=true) }}
{{ documents | tojson(separators=(',', ':')) }}
{{ custom }} {{ strftime_now('%Y') }}
{% if add_generation_prompt %}GO{% endif %}"""


def test_template_features_match_transformers(tmp_path, checkpoint, hf):
    """What a template sees besides the messages, as transformers hands it: the special tokens,
    extra keyword arguments, tools and documents; tojson's options, loop controls, strftime_now;
    and a message key set to None left out, as transformers does since 5.25 (5.17 still passed it)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "stop", "content": ""}, {"role": "user", "content": "never"}]
    docs = [{"title": "Doc", "text": "Body ü"}]
    kwargs = dict(tools=TOOLS[:1], documents=docs, add_generation_prompt=True, custom="value")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer(tokenizer_dir(tmp_path, checkpoint, config, TEMPLATE_FEATURES))
    text = tokenizer.apply_chat_template(messages, **kwargs)
    assert text == hf.apply_chat_template(messages, chat_template=TEMPLATE_FEATURES, tokenize=False, **kwargs)
    assert "[user|hi|False]" in text and "never" not in text and f"value {datetime.now():%Y}" in text
    with_none = [{**messages[0], "extra": None}, *messages[1:]]
    assert tokenizer.apply_chat_template(with_none, **kwargs) == text


def test_no_chat_template_is_a_value_error(tmp_path, checkpoint):
    tok = Tokenizer(tokenizer_dir(tmp_path, checkpoint, {"eos_token": "<|endoftext|>"}))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_raise_exception_reaches_the_caller(tmp_path, checkpoint):
    tok = Tokenizer(tokenizer_dir(tmp_path, checkpoint, template="{% if messages[0].role != 'user' %}{{ raise_exception('x') }}{% endif %}ok"))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "ok"
    with pytest.raises(jinja2.TemplateError, match="^x$"):
        tok.apply_chat_template([{"role": "system", "content": "hi"}])


def test_the_sandbox_refuses_python_internals(tmp_path, checkpoint):
    """A template is code from the checkpoint: jinja's sandbox makes an unsafe attribute undefined
    (rendering as nothing) and raises SecurityError on any use of it, and the immutable sandbox
    refuses to change the caller's messages."""
    messages = [{"role": "user", "content": "hi"}]
    for template, refused in [("{{ ''.__class__ }}", False), ("{{ ''.__class__.__mro__ }}", True), ("{{ messages.append(messages[0]) }}", True)]:
        tok = Tokenizer(tokenizer_dir(tmp_path / str(len(template)), checkpoint, template=template))
        if refused:
            with pytest.raises(jinja2.exceptions.SecurityError, match="unsafe"):
                tok.apply_chat_template(messages)
        else:
            assert tok.apply_chat_template(messages) == ""
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("files", [("vocab.json", "merges.txt"), ("tokenizer.model",), ("tokenizer_config.json",)])
def test_a_tokenizer_without_tokenizer_json_is_refused(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json is needed") as error:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(error.value)


ENGINE_SCRIPT = """\
import sys
import minivllm
from minivllm.engine import LLM, SamplingParams

minivllm.interpret_without_gpu()
llm = LLM(sys.argv[1], max_model_len=64, max_num_batched_tokens=64)
prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
(out,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
assert isinstance(out["text"], str) and len(out["token_ids"]) == 3, out
print(sorted(name for name in sys.modules if name.split(".")[0] == "transformers"))
"""


def test_the_engine_serves_text_without_transformers(checkpoint):
    """An LLM on a checkpoint with a tokenizer, generating from a chat-templated text prompt,
    in a fresh interpreter: transformers is never imported."""
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(checkpoint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


CORRUPT = {"truncated": b'{"model": {', "not JSON": b"\xff\xfe", "an array": b"[1, 2]"}


@pytest.mark.parametrize("content", list(CORRUPT.values()) + [b"{}"], ids=[*CORRUPT, "no model"])
def test_a_corrupt_tokenizer_json_is_named(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'tokenizer.json'))} is not a readable tokenizer"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_tokenizer_config_is_named(tmp_path, checkpoint, content):
    tokenizer_dir(tmp_path, checkpoint)
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'tokenizer_config.json'))}"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"eos_token": 5}, "eos_token"),
        ({"pad_token": ["<pad>"]}, "pad_token"),
        ({"eos_token": {"id": 3}}, "eos_token"),
        ({"chat_template": 5}, "chat_template"),
        ({"chat_template": [5]}, "chat_template"),
        ({"chat_template": [{"name": "default"}]}, "chat_template"),
        ({"chat_template": [{"name": "default", "template": None}]}, "chat_template"),
    ],
)
def test_a_tokenizer_config_value_of_the_wrong_type_is_named(tmp_path, checkpoint, config, key):
    """Each once failed with a TypeError, AttributeError or KeyError naming no file, or (an
    AddedToken without content) silently dropped the token."""
    tokenizer_dir(tmp_path, checkpoint, config)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'tokenizer_config.json'))}: '{key}' must be"):
        Tokenizer(tmp_path)


def test_a_chat_template_file_that_is_not_utf8_is_named(tmp_path, checkpoint):
    tokenizer_dir(tmp_path, checkpoint)
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'chat_template.jinja'))} is not UTF-8 text"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_chat_template_that_does_not_compile_is_named(tmp_path, checkpoint, where):
    """Found when a prompt is rendered, as transformers does: a checkpoint whose template is
    broken still serves plain prompts."""
    template = "{% for %}"
    tok = Tokenizer(tokenizer_dir(tmp_path, checkpoint, {"chat_template": template} if where != "chat_template.jinja" else None,
                                  template if where == "chat_template.jinja" else None))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / where))}: the chat template does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(tok.encode("hi")) == "hi"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda tok: tok.encode(None), "^text must be a str, got None"),
        (lambda tok: tok.encode(b"hi"), "^text must be a str, got b'hi'"),
        (lambda tok: tok.decode([1, -1]), r"^ids must be a list of token ids \(ints >= 0\), got -1 at position 1"),
        (lambda tok: tok.decode([1, True]), r"^ids must be .* got True at position 1"),
        (lambda tok: tok.decode([1.0]), r"^ids must be .* got 1.0 at position 0"),
        (lambda tok: tok.decode(5), r"^ids must be a list of token ids .* got int"),
        (lambda tok: tok.decode([1], skip_special_tokens="no"), "^skip_special_tokens must be a bool, got 'no'"),
        (lambda tok: tok.apply_chat_template("hi"), r"^messages must be a list of dicts \(a conversation\), got str"),
        (lambda tok: tok.apply_chat_template([{"role": "user", "content": "hi"}, "hi"]), r"^messages\[1\] must be a dict, got 'hi'"),
        (lambda tok: tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt="no"), "^add_generation_prompt must be a bool"),
        (lambda tok: tok.apply_chat_template([{"role": "user", "content": "hi"}], tools={"name": "f"}), r"^tools must be a list of dicts or None"),
        (lambda tok: tok.apply_chat_template([{"role": "user", "content": "hi"}], documents=["doc"]), r"^documents must be a list of dicts or None"),
    ],
)
def test_bad_arguments_name_the_argument(ours, call, match):
    with pytest.raises(ValueError, match=match):
        call(ours)
