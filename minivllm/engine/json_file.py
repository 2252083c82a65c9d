"""A checkpoint's JSON files (config.json, generation_config.json, tokenizer_config.json) read
with errors that name the file."""

import json
from pathlib import Path


def read_json_object(file: Path) -> dict:
    """The JSON object `file` holds; ValueError naming the file when it holds none (truncated,
    not UTF-8, not JSON, or another JSON value)."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value
