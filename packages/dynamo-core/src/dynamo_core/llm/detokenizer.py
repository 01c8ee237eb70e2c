"""Incremental detokenization and stop strings: the per-token text path of every stream.

`IncrementalDetokenizer` turns token ids, as they arrive, into the text they add, exactly as vLLM
does (vLLM steps `tokenizers`' ``DecodeStream`` once per token, and so gives the frontend's
oracle: a differential test in the vllm_cpu session compares the two):

1. It never emits half a character. In byte-level BPE one character of "中文" or an emoji is often
   split over two or three tokens, and decoding a prefix gives U+FFFD for the missing bytes. While
   the decoded tail ends in U+FFFD the text is held back, until the character completes.
2. What is still held back when the stream ends is dropped: no U+FFFD for an unfinished
   character, and no text for a complete character that shares a token with the unfinished one
   (a token `" \xe4"` holds its space back with the lead byte). vLLM returns the same text.
3. Ids that arrive together (one engine output with several tokens) give what stepping them one
   at a time gives: when the last one leaves a partial character, the text up to the last id
   that ended on a whole character is emitted, as vLLM would have emitted it.

So the concatenation of everything `push` returns equals ``tokenizer.decode(ids[:k])``, for the
largest `k` whose decode does not end in U+FFFD. (With ``prompt_tail``, the text those ids add
after the prompt tail: the context matters for SentencePiece-style tokenizers, whose decoder
drops the leading space of the first token of a sequence; vLLM primes its stream with the prompt.)

How (the prefix/read offsets of vLLM's incremental detokenizer, and of ``DecodeStream``): only a
short window of ids is decoded, never the whole sequence. ``read`` marks the ids whose text has
been emitted, ``prefix`` a few ids before it, kept as left context. On each push,
``decode(ids[prefix:])`` minus the (cached) ``decode(ids[prefix:read])`` is the new text. When it
is emitted, the offsets advance (prefix := read, read := end) and the cached prefix text is
refreshed; the window is then typically one or two tokens long, so a push costs one or two small
``decode`` calls: O(1) per token (the refresh of a one-id window is looked up in a cache of
``decode([id])`` the tokenizer keeps, so most tokens cost one call). Ids that arrive together are stepped one at a time too (the
window then is the one vLLM has, which byte-fallback decoders need to give its text). The window
list is trimmed from time to time so it does not grow with the stream. When the decode of the window no longer starts with the text already
emitted from it (byte-fallback tokenizers fed invalid bytes), ``DecodeStream`` raises and vLLM
restarts it from the current id alone; so does this class.

Why not ``tokenizers.decoders.DecodeStream`` itself? It would save one Python->Rust call per
token, but its restart on a mismatched prefix is the caller's job, it has no count of held ids,
and tokenizers older than 0.21 lack it.

A stream of invalid bytes (a model emitting random continuation-byte tokens) keeps the tail
ending in U+FFFD, so the window grows and each push decodes all of it: linear in the tokens held,
as in vLLM, and only for as long as the garbage lasts (valid UTF-8 completes a character within 4
bytes). Emitting such a tail early would print text vLLM never prints.

`StopStringMatcher` applies stop strings to that text: it holds back any tail that could be the
start of a stop string, emits it once it cannot be, and on a match emits only the text before the
stop. When several stop strings match, the one that completes first wins (then the earlier one in
the request's list), as in vLLM, so the cut does not depend on how the text was chunked. Text fed
with ``check=False`` (that of the first ``min_tokens`` tokens) may start a stop string but not end
one, which is vLLM's ``min_tokens`` rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynamo_core.llm.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "LogprobTokens", "StopStringMatcher"]

_REPLACEMENT = "\ufffd"

# Trim the id window once this many ids lie before `prefix` (amortized O(1) list maintenance).
_TRIM_AT = 256


class IncrementalDetokenizer:
    """Text of a stream of token ids, emitted as it becomes complete (see the module docstring)."""

    __slots__ = ("_alone", "_decode", "_ids", "_prefix", "_prefix_text", "_read", "_skip", "_total")

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        prompt_tail: Sequence[int] | None = None,
    ) -> None:
        # Bind the Rust decode once: it is called for every token.
        self._decode = tokenizer.backend.decode
        self._alone = tokenizer.alone_texts(skip_special_tokens)
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_tail or ())
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text: str = (
            self._decode(self._ids, skip_special_tokens=skip_special_tokens) if self._ids else ""
        )
        if self._prefix_text.endswith(_REPLACEMENT):
            # a prompt ending inside a character gives no usable context
            del self._ids[:]
            self._read = 0
            self._prefix_text = ""
        self._total = 0

    @property
    def num_tokens(self) -> int:
        """Ids pushed so far (the prompt tail not included)."""
        return self._total

    @property
    def held(self) -> int:
        """Ids pushed whose text is still held back (an unfinished character)."""
        return len(self._ids) - self._read

    def push(self, token_ids: Sequence[int]) -> str:
        """Add ids; return the text they complete ("" while a character is still partial).

        Several ids are stepped one at a time, as vLLM steps them: where a whole character
        comes before a cut one, or where later bytes would change how earlier ones decode
        (byte fallback), decoding them together would not give vLLM's text.
        """
        if len(token_ids) == 1:
            return self._step(token_ids[0])
        return "".join([self._step(t) for t in token_ids])

    def _step(self, token_id: int) -> str:
        """One id, as `tokenizers`' ``DecodeStream.step`` (and so vLLM) handles it."""
        ids = self._ids
        ids.append(token_id)
        self._total += 1
        text: str = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
        if not self._complete(text):
            return ""
        if not text.startswith(self._prefix_text):
            # The decode of the window changed text already emitted (byte-fallback tokenizers,
            # invalid bytes). DecodeStream raises here and vLLM restarts it from this id alone.
            self._prefix = self._read = len(ids) - 1
            self._prefix_text = ""
            text = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
            if not self._complete(text):
                return ""
        return self._emit(text)

    def _complete(self, text: str) -> bool:
        return len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT)

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        ids = self._ids
        self._prefix = self._read
        self._read = len(ids)
        if self._read - self._prefix == 1:  # the usual window: one id, its text cached
            token = ids[-1]
            alone = self._alone.get(token)
            if alone is None:
                alone = self._alone[token] = self._decode((token,), skip_special_tokens=self._skip)
            self._prefix_text = alone
        else:
            self._prefix_text = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
        if self._prefix >= _TRIM_AT:
            del ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta


class LogprobTokens:
    """The text and bytes that log-probabilities show for each token of one stream.

    The text is vLLM's: `Tokenizer.token_string`, except for a token whose string ends in U+FFFD
    (part of a character). Such a token is decoded after up to `CONTEXT` preceding chosen
    tokens: when that completes the character, it shows the part of the text the earlier
    tokens did not show (the whole character, on the token that completes it); when nothing
    does, it shows "". The alternatives at one position are decoded after the same tokens.
    The bytes are the token's own (`Tokenizer.token_bytes`), so that joining them over the
    chosen tokens gives the output's bytes even where a character spans tokens.
    """

    __slots__ = ("_context", "_tokenizer")

    #: Preceding tokens tried as context: enough for any UTF-8 sequence (vLLM's number).
    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._context: list[int] = []

    def entry(self, token_id: int) -> tuple[str, bytes]:
        """The text and bytes of `token_id` at the current position."""
        tok = self._tokenizer
        text = tok.token_string(token_id)
        if text.endswith(_REPLACEMENT):
            text = self._completed(token_id)
        return text, tok.token_bytes(token_id)

    def advance(self, token_id: int) -> None:
        """`token_id` was chosen at the current position; move to the next."""
        context = self._context
        context.append(token_id)
        if len(context) > self.CONTEXT:
            del context[0]

    def _completed(self, token_id: int) -> str:
        decode = self._tokenizer.decode
        context = self._context
        for n in range(1, len(context) + 1):
            window = context[-n:]
            text = decode([*window, token_id], skip_special_tokens=False)
            if text.endswith(_REPLACEMENT):
                continue
            # the context tokens that were themselves part of a character showed nothing:
            # their share of the text is this token's
            clean = len(window)
            while clean and self._tokenizer.token_string(window[clean - 1]).endswith(_REPLACEMENT):
                clean -= 1
            shown = decode(window[:clean], skip_special_tokens=False) if clean else ""
            common = 0
            for a, b in zip(shown, text, strict=False):
                if a != b:
                    break
                common += 1
            return text[common:]
        return ""


class StopStringMatcher:
    """Cut a text stream at the first stop string, holding back possible partial matches."""

    __slots__ = ("_buffer", "_floor", "_max_hold", "_stopped", "stops")

    def __init__(self, stops: Sequence[str]) -> None:
        # Empty stop strings would match everywhere; OpenAI clients send [""] by accident.
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._buffer = ""
        # chars at the start of the buffer that were fed unchecked: no match may end in them
        self._floor = 0
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str, check: bool = True) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was hit).

        With ``check=False`` (the text of tokens within ``min_tokens``) no stop string may end
        in `text`, but one may start there and end in later text. After a hit, every later
        call returns ("", True).
        """
        if self._stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._buffer + text
        if check:
            cut = self._first_match(buffer)
            if cut != -1:
                self._buffer = ""
                self._stopped = True
                return buffer[:cut], True
        hold = self._partial_match_len(buffer)
        self._buffer = buffer[len(buffer) - hold :] if hold else ""
        self._floor = 0 if check else hold
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (it did not become a stop string)."""
        held, self._buffer = self._buffer, ""
        return "" if self._stopped else held

    def _first_match(self, buffer: str) -> int:
        """Where the stop string that completes first in `buffer` starts (-1: none).

        vLLM's rule: the earliest end wins, then the earlier stop string in the request's list.
        """
        floor = self._floor
        best_end = -1
        best_at = -1
        for stop in self.stops:
            at = buffer.find(stop, max(0, floor - len(stop) + 1))
            if at != -1 and (best_end == -1 or at + len(stop) < best_end):
                best_end = at + len(stop)
                best_at = at
        return best_at

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
