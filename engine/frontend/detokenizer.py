"""Incremental detokenization of one request: new token ids in, new text out, with stop strings.

Holds back an incomplete UTF-8 character and the tail that could still become a stop string; never samples.
"""

from __future__ import annotations

from omnistream.engine.checkpoint.tokenizer import Tokenizer

# Prompt tokens decoded in front of the output so that tokenizers which read context (e.g. leading spaces) agree.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """vLLM-style prefix/read offsets over the token ids; `output_text` is the text so far (stop applied)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = [s for s in stop or [] if s]
        self._include_stop = include_stop_str_in_output
        # A stop string may start this many characters before new text; that tail is held back
        # (unless the stop string is kept in the output anyway, so nothing shown can need retracting).
        self._stop_overlap = max(map(len, self._stop)) - 1 if self._stop else 0
        self._holdback = 0 if include_stop_str_in_output else self._stop_overlap
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if self._decode(context).endswith("\ufffd"):  # a prompt ending mid-character would garble the output
            context = []
        self._ids = context
        self._prefix_offset = 0  # ids[prefix:read] decode to text already in output_text
        self._read_offset = len(context)
        self._emitted = 0  # characters of output_text returned so far
        self.output_text = ""
        self.stop_string_matched: str | None = None

    def update(self, new_token_ids: list[int]) -> str:
        """Consume new token ids; return the text they make newly safe to show (possibly "")."""
        for token_id in new_token_ids:
            if self.stop_string_matched is not None:
                break
            self._ids.append(token_id)
            prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
            new_text = self._decode(self._ids[self._prefix_offset:])
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                self._append(new_text[len(prefix_text):])
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._take(self._holdback)

    def flush(self) -> str:
        """End of the request: release everything held back, including an unfinished character."""
        if self.stop_string_matched is None and self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
            self._append(self._decode(self._ids[self._prefix_offset:])[len(prefix_text):])
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._take(0)

    def _append(self, text: str) -> None:
        """Add decoded text and cut it at the earliest stop string that ends inside it."""
        start = max(0, len(self.output_text) - self._stop_overlap)
        self.output_text += text
        found = [(self.output_text.find(s, start), s) for s in self._stop]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, stop = min(found, key=lambda f: f[0])
            self.stop_string_matched = stop
            self.output_text = self.output_text[: index + len(stop) if self._include_stop else index]

    def _take(self, holdback: int) -> str:
        end = len(self.output_text) if self.stop_string_matched is not None else len(self.output_text) - holdback
        delta = self.output_text[self._emitted:end] if end > self._emitted else ""
        self._emitted += len(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
