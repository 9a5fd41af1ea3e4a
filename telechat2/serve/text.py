"""Turning a stream of token ids into text: incremental detokenization and stop strings.

Decoding token by token is wrong for sentencepiece: a Chinese character may span several byte-fallback tokens and
a piece's leading space depends on its neighbours. `TextStream` uses the offset trick of TGI/vLLM: decode a short
window that starts a few tokens back, emit only what grew, and hold text that ends in an incomplete character.
Stop strings are matched on the text, not on tokens, because a stop string rarely aligns with token boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from telechat2.tokenizer import TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END

REPLACEMENT_CHAR = "\ufffd"
TOOL_MARKERS = (TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END)


class Detokenizer(Protocol):
    special_ids: frozenset[int]
    special_piece_to_id: dict[str, int]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...


def hidden_token_ids(tokenizer: Detokenizer) -> frozenset[int]:
    """Special ids that never show in generated text: every control token except the tool-call markers."""
    visible = {tokenizer.special_piece_to_id.get(piece) for piece in TOOL_MARKERS}
    return frozenset(tokenizer.special_ids - visible)


class TextStream:
    """Accumulates generated ids; `push` returns (this token's text, text now safe to release to the client).

    keep_stop=True (TGI) keeps a matched stop string in the text; keep_stop=False (OpenAI) cuts it, which means
    text that could be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer: Detokenizer, stop: Sequence[str] = (), keep_stop: bool = True) -> None:
        self.tokenizer = tokenizer
        # Control tokens (<_end>, <_user>...) are not text; tool-call markers are, so the caller can parse calls.
        self.hidden_ids = hidden_token_ids(tokenizer)
        self.stop = [s for s in stop if s]
        self.keep_stop = keep_stop
        self.ids: list[int] = []
        self.text = ""  # visible text decoded so far (special tokens skipped)
        self.released = 0  # characters of self.text already handed to the client
        self.stopped_by: str | None = None
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode([i for i in self.ids[start:end] if i not in self.hidden_ids])

    def _token_delta(self) -> str:
        prefix = self._decode(self._prefix_offset, self._read_offset)
        current = self._decode(self._prefix_offset)
        if len(current) > len(prefix) and not current.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return current[len(prefix) :]
        return ""

    def push(self, token_id: int) -> tuple[str, str]:
        """Add one generated id; returns (token text for TGI's per-token field, newly releasable text)."""
        if self.stopped_by is not None:
            return "", ""
        self.ids.append(int(token_id))
        if token_id in self.hidden_ids:
            self._prefix_offset = self._read_offset = len(self.ids)
            return self.tokenizer.id_to_piece(token_id), ""
        delta = self._token_delta()
        if not delta:
            return "", ""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        self._match_stop(search_from)
        return delta, self._release(final=False)

    def _match_stop(self, search_from: int) -> None:
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(index, s) for index, s in hits if index >= 0]
        if hits:
            index, stop = min(hits)
            self.stopped_by = stop
            self.text = self.text[: index + len(stop) if self.keep_stop else index]

    def _held_back(self) -> int:
        """Characters at the end of the text that might begin a stop string (only when stops are cut)."""
        if self.keep_stop or self.stopped_by is not None:
            return 0
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.released:
            return ""
        chunk = self.text[self.released : end]
        self.released = end
        return chunk

    def finish(self) -> str:
        """Generation ended: release what was held back (incomplete characters included, as decoded)."""
        if self.stopped_by is None:
            full = self._decode(0)
            if full.startswith(self.text) and len(full) > len(self.text):
                search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
                self.text = full
                self._match_stop(search_from)
        return self._release(final=True)
