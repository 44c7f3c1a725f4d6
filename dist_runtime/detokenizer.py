"""Text as tokens arrive. A token may end in the middle of a multi-byte character, so new text
is released only once it decodes without a trailing replacement character; a few tokens
before it are decoded along, so that tokenizers that merge spaces across tokens stay right."""

from __future__ import annotations

from dist_runtime.tokenizer import Tokenizer

CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the tokens decoded for context
        self.read_offset = len(self.ids)  # tokens up to here have been turned into text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append a token; returns the text it completes (often '', for a partial character)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        delta = self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
