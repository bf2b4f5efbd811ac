"""The answer's text while it is generated: a transformers streamer that turns new token ids into text pieces.

Decoding token by token would break characters that span several byte-level tokens (CJK, emoji) into
replacement characters, and decoding the whole answer at every step costs quadratic time. So each step decodes
a short window — the tokens since the last emitted piece, with the piece before them as context — and emits
only what is complete (no trailing U+FFFD). Concatenated, the pieces are a prefix of the final text; what is
held back at the end comes with the final result.
"""
from __future__ import annotations

from typing import Callable, Iterable


class TextDeltaStreamer:
    """`generate(streamer=...)`: calls `on_text(piece)` for each new complete piece of text, on the generating
    thread. `skip_ids` (the stop tokens) never become text, as in the final answer."""

    def __init__(self, decode: Callable[[list[int]], str], skip_ids: Iterable[int], on_text: Callable[[str], None]):
        self.decode = decode
        self.skip_ids = frozenset(int(t) for t in skip_ids)
        self.on_text = on_text
        self.ids: list[int] = []
        self._prompt_seen = False
        self._context = 0   # start of the window: the tokens of the previous piece
        self._emitted = 0   # tokens already turned into text

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        new = [int(t) for t in value.reshape(-1).tolist() if int(t) not in self.skip_ids]
        if not new:
            return
        self.ids.extend(new)
        piece = self._complete_piece()
        if piece:
            self.on_text(piece)

    def end(self) -> None:
        """Nothing to flush: incomplete characters held back are in the final text."""

    def _complete_piece(self) -> str:
        before = self.decode(self.ids[self._context:self._emitted])
        after = self.decode(self.ids[self._context:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._context, self._emitted = self._emitted, len(self.ids)
        return after[len(before):]
