"""The engine's tokenizer (a `tokenizer.json` of the `tokenizers` library)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from dist_runtime.errors import EngineError


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        file = Path(folder) / "tokenizer.json"
        if not file.is_file():
            raise EngineError(f"{folder}: no tokenizer.json; pass token ids instead of text")
        self._tok = HFTokenizer.from_file(str(file))
        self.eos_ids = tuple(self._generation_eos(Path(folder)))

    @staticmethod
    def _generation_eos(folder: Path) -> list[int]:
        """Extra stop ids from generation_config.json (Llama 3 instruct stops on several)."""
        file = folder / "generation_config.json"
        if not file.is_file():
            return []
        eos = json.loads(file.read_text()).get("eos_token_id")
        return eos if isinstance(eos, list) else [] if eos is None else [eos]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
