"""Streaming text out of token ids: never half a UTF-8 character, stop strings across tokens.

Pure Python over any tokenizer with ``decode``. ``TextStream.push(ids)`` returns the text that is
safe to show now and whether a stop string was hit. Text is decoded over a small window of
recent ids (so multi-token characters and leading-space markers come out right) and held back
while it ends in a replacement character (an incomplete UTF-8 sequence) or could still be the
beginning of a stop string. The engine uses the same class to decide when a stop string ends
generation, so origin and thief agree token for token.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Decoder, stop: list[str] | None = None):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted text
        self._read = 0  # ids up to here are reflected in emitted (or held) text
        self._held = ""  # decoded but not yet shown (possible start of a stop string)
        self._stop = [s for s in (stop or []) if s]
        self.is_stopped = False
        self.text = ""  # everything shown so far

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly visible text (empty once stopped)."""
        if self.is_stopped:
            return ""
        self._ids += token_ids
        before = self._tok.decode(self._ids[self._prefix:self._read])
        after = self._tok.decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(self._held + after[len(before):])

    def flush(self) -> str:
        """At the end of the stream: what was held back (an incomplete character decodes to U+FFFD,
        text that could have begun a stop string is shown)."""
        if self.is_stopped:
            return ""
        before = self._tok.decode(self._ids[self._prefix:self._read])
        tail = self._tok.decode(self._ids[self._prefix:])[len(before):]
        self._prefix = self._read = len(self._ids)
        out = self._emit(self._held + tail)
        if not self.is_stopped:
            out, self._held = out + self._held, ""
            self.text += self._held
        return out

    def _emit(self, candidate: str) -> str:
        hits = [(candidate.find(s), s) for s in self._stop if s in candidate]
        if hits:
            cut = min(hits)[0]
            self.is_stopped = True
            self._held = ""
            self.text += candidate[:cut]
            return candidate[:cut]
        keep = self._longest_stop_prefix_suffix(candidate)
        out, self._held = candidate[:len(candidate) - keep], candidate[len(candidate) - keep:]
        self.text += out
        return out

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best
