"""Incremental detokenization and stop strings: the per-token text path of every stream.

`IncrementalDetokenizer` turns token ids, as they arrive, into the text they add. Two rules:

1. The concatenation of everything `push` returns, plus `flush`, equals
   ``tokenizer.decode(all_ids, skip_special_tokens=...)`` exactly. (With ``prompt_tail``, it equals
   the text the generated ids add after the prompt tail: the context matters for SentencePiece-style
   tokenizers, whose decoder drops the leading space of the first token of a sequence.)
2. It never emits half a character. In byte-level BPE one character of "中文" or an emoji is often
   split over two or three tokens, and decoding a prefix gives U+FFFD for the missing bytes. While
   the decoded tail ends in U+FFFD the text is held back, until the character completes.

How (the prefix/read offsets of vLLM's incremental detokenizer, and of `tokenizers`'
``DecodeStream``): only a short window of ids is decoded, never the whole sequence. ``read`` marks
the ids whose text has been emitted, ``prefix`` a few ids before it, kept as left context. On each
push, ``decode(ids[prefix:])`` minus the (cached) ``decode(ids[prefix:read])`` is the new text. When
it is emitted, the offsets advance (prefix := read, read := end) and the cached prefix text is
refreshed; the window is then typically one or two tokens long, so a push costs one or two small
``decode`` calls: O(1) per token. The window list is trimmed from time to time so it does not
grow with the stream.

Why not ``tokenizers.decoders.DecodeStream`` (tokenizers 0.23 has it, same algorithm, in Rust)? It
has no flush: text it holds back at the end of a stream (an invalid byte sequence) is lost, which
breaks rule 1; and it raises on some prefix mismatches. Its speed gain is one Python->Rust call per
token; this class makes one or two.

A stream of invalid bytes (a model emitting random byte tokens) could leave the tail ending in
U+FFFD for ever, growing the window and making each push slower. Valid UTF-8 completes a character
within 4 byte tokens, so after `MAX_PENDING_TOKENS` ids without a complete character the tail is
taken as final and emitted, U+FFFD included.

`StopStringMatcher` applies stop strings to that text: it holds back any tail that could be the
start of a stop string, emits it once it cannot be, and on a match emits only the text before the
stop (the earliest match when several stop strings could match).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynamo_core.llm.tokenizer import Tokenizer

__all__ = ["MAX_PENDING_TOKENS", "IncrementalDetokenizer", "StopStringMatcher"]

_REPLACEMENT = "\ufffd"

#: Ids held without completing a character before the tail is emitted as it is (see docstring).
MAX_PENDING_TOKENS = 16

# Trim the id window once this many ids lie before `prefix` (amortized O(1) list maintenance).
_TRIM_AT = 256


class IncrementalDetokenizer:
    """Text of a stream of token ids, emitted as it becomes complete (see the module docstring)."""

    __slots__ = ("_decode", "_ids", "_prefix", "_prefix_text", "_read", "_skip", "_total")

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        prompt_tail: Sequence[int] | None = None,
    ) -> None:
        # Bind the Rust decode once: it is called for every token.
        self._decode = tokenizer.backend.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_tail or ())
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text: str = (
            self._decode(self._ids, skip_special_tokens=skip_special_tokens) if self._ids else ""
        )
        self._total = 0

    @property
    def num_tokens(self) -> int:
        """Ids pushed so far (the prompt tail not included)."""
        return self._total

    def push(self, token_ids: Iterable[int]) -> str:
        """Add ids; return the text they complete ("" while a character is still partial)."""
        ids = self._ids
        before = len(ids)
        ids.extend(token_ids)
        self._total += len(ids) - before
        text: str = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
        prefix_len = len(self._prefix_text)
        if len(text) > prefix_len and (
            not text.endswith(_REPLACEMENT) or len(ids) - self._read > MAX_PENDING_TOKENS
        ):
            self._advance()
            return text[prefix_len:]
        return ""

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end of the stream)."""
        if self._read == len(self._ids):
            return ""
        text: str = self._decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        delta = text[len(self._prefix_text) :]
        self._advance()
        return delta

    def _advance(self) -> None:
        ids = self._ids
        self._prefix = self._read
        self._read = len(ids)
        self._prefix_text = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
        if self._prefix >= _TRIM_AT:
            del ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


class StopStringMatcher:
    """Cut a text stream at the first stop string, holding back possible partial matches."""

    __slots__ = ("_buffer", "_max_hold", "_stopped", "stops")

    def __init__(self, stops: Sequence[str]) -> None:
        # Empty stop strings would match everywhere; OpenAI clients send [""] by accident.
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._buffer = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was hit).

        After a hit, every later call returns ("", True).
        """
        if self._stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._buffer + text
        cut = -1
        for stop in self.stops:
            at = buffer.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut = at
        if cut != -1:
            self._buffer = ""
            self._stopped = True
            return buffer[:cut], True
        hold = self._partial_match_len(buffer)
        if hold:
            self._buffer = buffer[-hold:]
            return buffer[:-hold], False
        self._buffer = ""
        return buffer, False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (it did not become a stop string)."""
        held, self._buffer = self._buffer, ""
        return "" if self._stopped else held

    def _partial_match_len(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        limit = min(self._max_hold, len(buffer))
        for stop in self.stops:
            for n in range(min(len(stop) - 1, limit), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest
