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
        self.config = _read_json(folder / "tokenizer_config.json")  # chat template, special tokens
        self.eos_ids = tuple(_generation_eos(folder / "generation_config.json"))

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


def _generation_eos(file: Path) -> list[int]:
    """Extra stop ids from generation_config.json (Llama 3 instruct stops on several)."""
    eos = _read_json(file).get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(t, int) for t in eos):
        raise EngineError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return eos
