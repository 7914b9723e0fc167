"""Incremental detokenization: text for each new token without decoding the whole output again.

The approach of vLLM and TGI: keep two offsets into the ids, decode only the short window from
``prefix_offset`` with and without the newest tokens, and emit the difference. Decoding a window that
starts before the new tokens keeps what a tokenizer does at a word start (SentencePiece's leading
space) the same as in a full decode. A window ending in half of a multi-byte character (U+FFFD) is held
back until the rest arrives."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def _window(self) -> str:
        """New text of the window; falls back to one whole decode where the tokenizer's clean-up makes
        the window's text disagree with its own prefix (rare: clean-up around a window's start)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.startswith(prefix):
            return full[len(prefix):]
        whole = self._decode(self.ids)
        return whole[len(self.text):] if whole.startswith(self.text) else ""

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        delta = self._window()
        if delta and not delta.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back (an incomplete character stays as
        the decoder renders it, U+FFFD)."""
        delta = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
