"""A checkpoint's tokenizer without transformers: text to token ids and back through the
`tokenizers` library's tokenizer.json, and chat templates rendered with jinja2 the way
transformers renders them (same sandbox, options, filters and globals), so a prompt built here
is the prompt the model was trained on. A file that cannot be read, or a value of the wrong type
in one, is a ValueError naming the file (and the key).
"""

import json
from datetime import datetime
from functools import cache
from pathlib import Path

import jinja2.ext
import jinja2.sandbox
import tokenizers

from minivllm.engine.json_file import read_json_object
from minivllm.values import check_bool, is_int

# The named special tokens transformers hands every chat template as strings.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """The tokenizer of a Hugging Face checkpoint directory: tokenizer.json (required), plus
    tokenizer_config.json's special tokens and chat template, or chat_template.jinja."""

    def __init__(self, path: str | Path):
        """ValueError when `path` has no tokenizer.json: a checkpoint with only vocab.json and
        merges.txt, or a sentencepiece tokenizer.model, needs converting by transformers first."""
        self.path = Path(path)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(
                f"{self.path}: tokenizer.json is needed; the engine reads no other tokenizer format (vocab.json/merges.txt or a sentencepiece "
                "tokenizer.model): load and save the tokenizer once with transformers to write one"
            )
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exceptions, which name no file
            raise ValueError(f"{file} is not a readable tokenizer.json (truncated or corrupt?): {e}") from e
        config_file = self.path / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.is_file() else {}
        # {name: token string} for the special tokens the config names.
        self.special_tokens = {name: token for name in SPECIAL_TOKEN_NAMES if (token := _token_string(config, name, config_file)) is not None}
        # The template's text, and the file it came from for errors about it.
        self.chat_template, self._chat_template_file = _chat_template(self.path, config, config_file)

    def __len__(self) -> int:
        """The number of token ids, added tokens included (transformers' len(tokenizer))."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence token's id; None when the config names none or the vocabulary lacks it."""
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self._tokenizer.token_to_id(eos)

    def encode(self, text: str) -> list[int]:
        """`text`'s token ids, special tokens written in it included, with whatever the
        tokenizer's post-processor adds (as transformers' add_special_tokens=True does)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {text!r}")
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids `ids` (a list or tuple of ints >= 0); special tokens are left out
        unless skip_special_tokens is False. An id past the tokenizer's vocabulary (a model's
        padding rows, say) decodes to nothing, as in transformers."""
        if not isinstance(ids, list | tuple):
            raise ValueError(f"ids must be a list of token ids (ints >= 0), got {type(ids).__name__}")
        for pos, t in enumerate(ids):
            if not is_int(t) or t < 0:
                raise ValueError(f"ids must be a list of token ids (ints >= 0), got {t!r} at position {pos}")
        return self._tokenizer.decode(list(ids), skip_special_tokens=check_bool("skip_special_tokens", skip_special_tokens))

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **kwargs) -> str:
        """The conversation `messages` (dicts with "role", "content", ...) rendered as prompt text by
        the checkpoint's chat template. `add_generation_prompt` appends the assistant's header;
        `tools` (JSON schemas) and `documents` go to templates that use them, and the keyword
        arguments (e.g. enable_thinking=False) are template variables too, as are the special
        tokens. ValueError when the checkpoint has no chat template, when it does not compile (naming
        its file), and for arguments of the wrong type."""
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat template (neither chat_template.jinja nor a chat_template in tokenizer_config.json)")
        if not isinstance(messages, list | tuple):
            raise ValueError(f"messages must be a list of dicts (a conversation), got {type(messages).__name__}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be a dict, got {message!r}")
        check_bool("add_generation_prompt", add_generation_prompt)
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not (isinstance(value, list | tuple) and all(isinstance(v, dict) for v in value)):
                raise ValueError(f"{name} must be a list of dicts or None, got {value!r}")
        try:
            template = _compile(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"{self._chat_template_file}: the chat template does not compile: {e}") from e
        # As transformers does: APIs send keys set to None (content=None beside tool_calls), which
        # templates handle as missing keys but would render as "None".
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        variables = self.special_tokens | kwargs
        return template.render(messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables)


def _token_string(config: dict, name: str, file: Path) -> str | None:
    """Special token `name` as tokenizer_config.json stores it, a string or an AddedToken dict,
    as its string; None when the config names none."""
    value = config.get(name)
    token = value.get("content") if isinstance(value, dict) else value
    if value is not None and not isinstance(token, str):
        raise ValueError(f"{file}: {name!r} must be a token string or an AddedToken object with a 'content' string, got {value!r}")
    return token


def _chat_template(path: Path, config: dict, config_file: Path) -> tuple[str | None, Path | None]:
    """(the checkpoint's chat template, the file it is in): chat_template.jinja (transformers >=
    4.43 saves it there), else tokenizer_config.json's, which may be a list of named templates
    (the "default" one counts); (None, None) when there is none."""
    file = path / "chat_template.jinja"
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8"), file
        except UnicodeDecodeError as e:
            raise ValueError(f"{file} is not UTF-8 text: {e}") from e
    template = config.get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template):
            raise ValueError(f"{config_file}: 'chat_template' must be a string or a list of {{\"name\": ..., \"template\": ...}} objects of strings, "
                             f"got {template!r}")
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    elif template is not None and not isinstance(template, str):
        raise ValueError(f"{config_file}: 'chat_template' must be a string or a list of named templates, got {template!r}")
    return template, config_file if template is not None else None


def _raise_exception(message: str):
    """The templates' raise_exception(message): refuses a conversation the template cannot render."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """The templates' tojson filter: plain json.dumps, not jinja's, which escapes <, >, & and '
    for HTML and so would change the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """The templates' strftime_now(format): the local time now, e.g. for a "Today is ..." line."""
    return datetime.now().strftime(format)


@cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment chat templates run in: sandboxed, since a template is code from the
    checkpoint, and immutable, so a template cannot change the caller's messages."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@cache
def _compile(template: str) -> jinja2.Template:
    """`template` compiled once: every prompt of a run renders the same template."""
    return _environment().from_string(template)
