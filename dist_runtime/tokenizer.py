"""The engine's tokenizer (a `tokenizer.json` of the `tokenizers` library), with the fields of
its `tokenizer_config.json` and the extra stop ids of its `generation_config.json`. A file
that does not parse is an EngineError naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from dist_runtime.errors import EngineError, RequestError


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise EngineError(f"{folder}: no tokenizer.json; pass token ids instead of text")
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise EngineError(f"{file}: unreadable ({e})") from e
        self.config = _read_json(folder / "tokenizer_config.json")  # special tokens, maybe chat templates
        self.generation_config = _read_json(folder / "generation_config.json")
        self.eos_ids = tuple(_generation_eos(self.generation_config, folder / "generation_config.json"))
        self.chat_templates = _chat_templates(folder, self.config)

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token and the like, as text (a chat template may use them)."""
        tokens = {}
        for key, value in self.config.items():
            value = value.get("content") if isinstance(value, dict) else value  # an AddedToken's fields
            if key.endswith("_token") and isinstance(value, str):
                tokens[key] = value
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; text the tokenizer refuses (a lone surrogate, say) is a RequestError."""
        if not isinstance(text, str):
            raise RequestError(f"prompt: expected text, got {type(text).__name__}", "prompt")
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise RequestError(f"prompt: the text cannot be tokenized ({e})", "prompt") from e

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; {} when there is no such file."""
    if not file.is_file():
        return {}
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise EngineError(f"{file}: unreadable ({e})") from e
    if not isinstance(content, dict):
        raise EngineError(f"{file}: holds a JSON {type(content).__name__}, not an object")
    return content


def _generation_eos(config: dict[str, Any], file: Path) -> list[int]:
    """Extra stop ids from generation_config.json (Llama 3 instruct stops on several)."""
    eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(t, int) for t in eos):
        raise EngineError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return eos


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Name -> Jinja source of every chat template the folder holds, where transformers looks:
    chat_template.jinja and additional_chat_templates/NAME.jinja (transformers 5), else
    chat_template.json, else tokenizer_config.json's chat_template (a string, or named ones).
    The unnamed one is "default"."""
    if (folder / "chat_template.jinja").is_file():
        templates = {"default": _read_text(folder / "chat_template.jinja")}
    elif (folder / "chat_template.json").is_file():
        templates = {"default": _read_json(folder / "chat_template.json").get("chat_template")}
    else:
        source = config.get("chat_template")
        templates = {t.get("name"): t.get("template") for t in source} if isinstance(source, list) else {
            "default": source}
    for file in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[file.stem] = _read_text(file)
    if not all(isinstance(name, str) and isinstance(t, str) for name, t in templates.items() if t is not None):
        raise EngineError(f"{folder}: a chat template that is not a named string")
    return {name: t for name, t in templates.items() if t}


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise EngineError(f"{file}: unreadable ({e})") from e
