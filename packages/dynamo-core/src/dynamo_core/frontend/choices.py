"""The output side of a request: one `ChoiceOutput` per choice, and where their batches come from.

A request with `n` choices sends `n` engine requests (`n` > 1 fans out, each choice with its own
seed when the request has one); `single`/`merged` give the batches of all of them to the stream
or the whole response as ``(choice index, batch)`` pairs, in the order they arrive, so the choices
of a stream interleave as their tokens come. `n` = 1 goes through `Single`, one coroutine call
per batch on top of the engine stream; only `n` > 1 pays for a task per choice.

`RESTART` is what the batches of a whole (non-streamed) constrained request yield when its
worker failed mid-way and the request starts again, from the beginning, on another one: a
structured-output constraint cannot continue from a prefix (engines restart the grammar), and
nothing has reached the client yet. The consumer then resets that choice.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from dynamo_core import errors
from dynamo_core.frontend.openai import finish_reason_for
from dynamo_core.llm.detokenizer import IncrementalDetokenizer, LogprobTokens, StopStringMatcher
from dynamo_core.llm.parsers import Event, ParsedOutput, ToolCallStart

if TYPE_CHECKING:
    from dynamo_core.frontend.models import ModelEntry
    from dynamo_core.frontend.structured import TextParser

__all__ = ["RESTART", "Batches", "ChoiceOutput", "Merged", "Single"]

Batches = AsyncGenerator[list[dict[str, Any]], None]
#: Yielded by a whole request's batches when it starts again elsewhere (see the docstring).
RESTART: list[dict[str, Any]] = []

#: Prompt ids the detokenizer keeps as left context for the first generated ones.
_PROMPT_CONTEXT = 6


class ChoiceOutput:
    """One choice's output: engine output maps into text and log-probabilities, applying stop
    strings, then (with a parser) into content, reasoning and tool-call events.

    `feed` sets `kept`, how many of the item's tokens belong to the output: a stop string ends
    it after the token that completes the stop string (vLLM's rule), also when that token came
    with others in one engine output; the tokens after it are neither counted nor shown.

    With a parser, special tokens are detokenized (the markup of most families is made of
    them), except the end-of-sequence token that ends the output, which is never text (vLLM
    drops the token that stopped a sequence from its text too).

    With `prompt_logprobs` (the count the engine was asked for) the choice's first item must
    carry the prompt's log-probabilities (`EngineOutput.prompt_log_probs`: a worker that sent
    none fails the choice, never leaves them out); they are shown as vLLM shows them:
    `prompt_logprobs_json` (its `prompt_logprobs` extension) and, for completions with `echo`
    and `logprobs` (`echo_logprobs`), `echo_completion_logprobs`: the prompt's tokens first in
    the choice's `logprobs`, `text_offset` counting from the prompt's first token.
    """

    __slots__ = (
        "_prompt",
        "cached",
        "calls",
        "completion_tokens",
        "detok",
        "echo_logprobs",
        "echo_pending",
        "finish",
        "hide_eos",
        "index",
        "kept",
        "last_at",
        "logprobs_wanted",
        "lp_tokens",
        "matcher",
        "min_tokens",
        "parser",
        "prompt",
        "prompt_pending",
        "prompt_wanted",
        "text_offset",
        "tokenizer",
    )

    def __init__(
        self,
        entry: ModelEntry,
        stops: list[str],
        logprobs: int | None,
        *,
        prompt: list[int] | None = None,
        min_tokens: int = 0,
        text_offset: int = 0,
        index: int = 0,
        parser: TextParser | None = None,
        skip_special_tokens: bool = True,
        prompt_logprobs: int | None = None,
        echo_logprobs: bool = False,
    ) -> None:
        self.index = index
        self.tokenizer = entry.tokenizer
        self.prompt = prompt or []
        self.prompt_wanted = prompt_logprobs
        """How many alternatives per prompt token the engine was asked for (None: no prompt
        log-probabilities)."""
        self.prompt_pending = prompt_logprobs is not None
        """The prompt's log-probabilities are still to come (with the first item)."""
        self.echo_pending = False
        """Set by `feed` when the prompt's completions entries are due (`echo_logprobs`)."""
        self.echo_logprobs = echo_logprobs and prompt_logprobs is not None
        """Completions with `echo` and `logprobs`: the prompt's tokens lead the logprobs."""
        self._prompt: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        self.parser = parser
        self.hide_eos = not skip_special_tokens
        self.detok = IncrementalDetokenizer(
            entry.tokenizer,
            skip_special_tokens=skip_special_tokens,
            prompt_tail=prompt[-_PROMPT_CONTEXT:] if prompt else None,
        )
        self.matcher = StopStringMatcher(stops) if stops else None
        self.min_tokens = min_tokens
        self.logprobs_wanted = logprobs
        self.lp_tokens = LogprobTokens(entry.tokenizer) if logprobs is not None else None
        self.text_offset = text_offset
        """Completions: where the next token's text starts in the choice's text (echo first)."""
        self.completion_tokens = 0
        self.kept = 0
        self.finish: str | None = None
        self.cached: int | None = None
        self.calls = 0
        """Tool calls the parser found so far."""
        self.last_at = 0.0
        """When this choice last produced tokens (monotonic), for the inter-token latency."""

    def feed(self, item: dict[str, Any]) -> str:
        """The text `item` adds; sets `kept`, and `finish` when the sequence ends.

        Text still held back at the end (part of a character) is dropped, as vLLM drops it.
        """
        if self.prompt_pending:
            self._take_prompt(item)
        ids = item.get("token_ids") or ()
        self.kept = len(ids)
        shown = ids
        if self.hide_eos and ids and item.get("finish_reason") == "eos":
            shown = ids[:-1]
        matcher = self.matcher
        if matcher is None:
            text = self.detok.push(shown) if shown else ""
        else:
            text = self._feed_stops(matcher, shown)
        self.completion_tokens += self.kept
        usage = item.get("usage")
        if usage:
            self.cached = usage.get("cached_tokens")
        if self.finish is not None:
            return text
        reason = item.get("finish_reason")
        if reason is not None:
            if reason == "error":
                raise errors.EngineError(item.get("error") or "the engine failed")
            if matcher is not None:
                text += matcher.flush()
            self.finish = finish_reason_for(reason) or "stop"
        return text

    def _take_prompt(self, item: dict[str, Any]) -> None:
        """The prompt's log-probabilities, from the choice's first item."""
        self.prompt_pending = False
        values = item.get("prompt_log_probs")
        if item.get("finish_reason") == "error":
            return  # `feed` raises the engine's own error
        if values is None or len(values) != len(self.prompt):
            raise errors.EngineError(
                "the worker returned no log-probabilities for the prompt"
                if values is None
                else f"the worker returned {len(values)} prompt log-probabilities for a "
                f"{len(self.prompt)}-token prompt"
            )
        tops = item.get("prompt_top_logprobs") or [()] * len(values)
        ranks = item.get("prompt_ranks") or [None] * len(values)
        self._prompt = (values, tops, ranks)
        self.echo_pending = self.echo_logprobs

    def check_prompt(self) -> None:
        """At the end of the choice: the prompt's log-probabilities came, when asked for."""
        if self.prompt_pending:
            raise errors.EngineError("the worker returned no log-probabilities for the prompt")

    def _prompt_positions(self) -> Any:
        """(token, its text, log-probability, alternatives, rank) per prompt token; the text
        and the alternatives' texts as vLLM shows them (`LogprobTokens`, the context being the
        prompt tokens before, the first excepted: vLLM keeps none for it)."""
        values, tops, ranks = self._prompt
        prompt = self.prompt
        # vLLM shows the first token (which has no log-probability) as its plain decode
        yield (
            prompt[0],
            self.tokenizer.decode(prompt[:1], skip_special_tokens=False),
            None,
            (),
            None,
        )
        texts = LogprobTokens(self.tokenizer)
        for token, lp, top, rank in zip(prompt[1:], values[1:], tops[1:], ranks[1:], strict=True):
            alternatives = [(alt, texts.entry(alt)[0], alt_lp) for alt, alt_lp in top]
            yield token, texts.entry(token)[0], lp, alternatives, rank
            texts.advance(token)

    def echo_completion_logprobs(self) -> dict[str, list[Any]]:
        """Completions with `echo`: the `logprobs` lists of the prompt's tokens (vLLM's): the
        first token's value and alternatives are null; each other's alternatives hold the
        token then the most likely others, up to `logprobs` + 1 entries."""
        self.echo_pending = False
        top_n = self.logprobs_wanted or 0
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token, text, lp, alternatives, _ in self._prompt_positions():
            tokens.append(text)
            offsets.append(self.text_offset)
            self.text_offset += len(text)
            if lp is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(_clamp(lp))
            shown = {text: _clamp(lp)}
            count = 1
            for alt, alt_text, alt_lp in alternatives:
                if count > top_n:
                    break
                if alt == token:
                    shown[text] = _clamp(alt_lp)
                    continue
                count += 1
                shown[alt_text] = _clamp(alt_lp)
            tops.append(shown)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def prompt_logprobs_json(self) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's `prompt_logprobs`: per prompt token null (the first) or a map of token id
        to ``{"logprob", "rank", "decoded_token"}``: the prompt token first, then the most
        likely ones with their ranks (the prompt token, when among them, keeps its place and
        takes their rank, as in vLLM's map)."""
        out: list[dict[str, dict[str, Any]] | None] = []
        for token, text, lp, alternatives, rank in self._prompt_positions():
            if lp is None:
                out.append(None)
                continue
            entry = {str(token): {"logprob": _clamp(lp), "rank": rank, "decoded_token": text}}
            for place, (alt, alt_text, alt_lp) in enumerate(alternatives, 1):
                entry[str(alt)] = {
                    "logprob": _clamp(alt_lp),
                    "rank": place,
                    "decoded_token": alt_text,
                }
            out.append(entry)
        return out

    def _feed_stops(self, matcher: StopStringMatcher, ids: Any) -> str:
        """Token by token, so that a stop string is cut after the token that completes it."""
        parts = []
        for i, token in enumerate(ids):
            counted = self.completion_tokens + i + 1
            text, hit = matcher.feed(self.detok.push((token,)), counted > self.min_tokens)
            parts.append(text)
            if hit:
                self.kept = i + 1
                self.finish = "stop"
                break
        return "".join(parts)

    def events(self, text: str) -> list[Event]:
        """The parser's events for `text` (and, once the choice has finished, for what it held
        back); counts the tool calls."""
        parser = self.parser
        assert parser is not None
        events = parser.feed(text) if text else []
        if self.finish is not None:
            events = [*events, *parser.finish()]
        for event in events:
            if type(event) is ToolCallStart:
                self.calls += 1
        return events

    def parsed(self, text: str) -> ParsedOutput:
        """The whole text, parsed (the text itself as content without a parser)."""
        if self.parser is None:
            return ParsedOutput(content=text)
        parsed = self.parser.parse(text)
        self.calls = len(parsed.tool_calls)
        return parsed

    def reason(self) -> str:
        """The choice's OpenAI finish reason: `tool_calls` when it stopped after calling tools."""
        reason = self.finish or "stop"
        return "tool_calls" if self.calls and reason == "stop" else reason

    def chat_logprobs(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The `logprobs.content` entries of the item's kept tokens."""
        texts = self.lp_tokens
        assert texts is not None
        top_n = self.logprobs_wanted or 0
        content = []
        for token, lp, top in self._positions(item):
            text, raw = texts.entry(token)
            alternatives = []
            for alt, alt_lp in top[:top_n]:
                alt_text, alt_raw = texts.entry(alt)
                alternatives.append(
                    {"token": alt_text, "logprob": _clamp(alt_lp), "bytes": list(alt_raw)}
                )
            content.append(
                {
                    "token": text,
                    "logprob": _clamp(lp),
                    "bytes": list(raw),
                    "top_logprobs": alternatives,
                }
            )
            texts.advance(token)
        return content

    def completion_logprobs(self, item: dict[str, Any]) -> dict[str, list[Any]]:
        """The completions `logprobs` lists of the item's kept tokens.

        `top_logprobs` holds the chosen token first, then the most likely others, up to
        `logprobs` + 1 entries (OpenAI's and vLLM's rule); `text_offset` is where each token's
        text starts in the choice's text (the sum of the token strings before it, as vLLM
        counts). With `echo` the prompt's tokens come first (`echo_completion_logprobs`).
        """
        texts = self.lp_tokens
        assert texts is not None
        top_n = self.logprobs_wanted or 0
        tokens: list[str] = []
        values: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for token, lp, top in self._positions(item):
            text, _ = texts.entry(token)
            shown = {text: _clamp(lp)}
            ids = [token]
            for alt, alt_lp in top:
                if len(ids) > top_n:
                    break
                if alt == token:
                    shown[text] = _clamp(alt_lp)
                    continue
                ids.append(alt)
                shown[texts.entry(alt)[0]] = _clamp(alt_lp)
            tokens.append(text)
            values.append(_clamp(lp))
            tops.append(shown)
            offsets.append(self.text_offset)
            self.text_offset += len(text)
            texts.advance(token)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _positions(self, item: dict[str, Any]) -> Any:
        ids = (item.get("token_ids") or ())[: self.kept]
        lps = item.get("log_probs") or ()
        tops = item.get("top_logprobs") or ()
        for i, (token, lp) in enumerate(zip(ids, lps, strict=False)):
            yield token, lp, tops[i] if i < len(tops) else ()


def _clamp(logprob: float) -> float:
    """-inf is not JSON: OpenAI and vLLM send -9999.0."""
    return logprob if logprob > -9999.0 else -9999.0


class Single:
    """The batches of a one-choice request: ``(0, batch)``, then ``(0, None)`` at the end. A
    stream reads `gen` itself after `first()` (no wrapper per batch on the hot path)."""

    __slots__ = ("_first", "gen")

    def __init__(self, gen: Batches, first: list[dict[str, Any]]) -> None:
        self.gen = gen
        self._first = first

    def first(self) -> tuple[int, list[dict[str, Any]] | None]:
        """The batch awaited before the response started."""
        return 0, self._first

    async def next(self) -> tuple[int, list[dict[str, Any]] | None]:
        return 0, await anext(self.gen, None)

    def drop(self, index: int) -> None:
        """The choice has finished: its batches are not read any more (closed by `aclose`)."""

    async def aclose(self) -> None:
        await self.gen.aclose()


class Merged:
    """The batches of `n` choices as they arrive: ``(i, batch)``; ``(i, None)`` when choice
    `i`'s stream ended. An error of any choice's stream is raised by `next`; `aclose` stops
    them all (the engines' requests are cancelled). At most one batch per choice is read ahead,
    so a slow client still holds back every worker (the request plane's bounded buffering)."""

    __slots__ = ("_dropped", "_gens", "_pending", "_ready")

    def __init__(self, gens: list[Batches], firsts: list[list[dict[str, Any]]]) -> None:
        self._gens = gens
        self._ready: deque[tuple[int, list[dict[str, Any]] | None]] = deque(enumerate(firsts))
        self._pending: dict[asyncio.Task[list[dict[str, Any]] | None], int] = {}
        self._dropped: list[asyncio.Task[list[dict[str, Any]] | None]] = []

    def first(self) -> tuple[int, list[dict[str, Any]] | None]:
        """A first batch (every choice's was awaited before the response started)."""
        return self._take()

    async def next(self) -> tuple[int, list[dict[str, Any]] | None]:
        if not self._ready:
            if not self._pending:
                raise RuntimeError("no choice left to read")
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = self._pending.pop(task)
                self._ready.append((index, task.result()))  # the stream's error, if it failed
        return self._take()

    def _take(self) -> tuple[int, list[dict[str, Any]] | None]:
        index, batch = self._ready.popleft()
        if batch is not None:
            self._pending[asyncio.create_task(_next_batch(self._gens[index]))] = index
        return index, batch

    def drop(self, index: int) -> None:
        """Choice `index` has finished: stop reading it (its stream is closed by `aclose`)."""
        for task, i in list(self._pending.items()):
            if i == index:
                task.cancel()
                del self._pending[task]
                self._dropped.append(task)

    async def aclose(self) -> None:
        tasks = [*self._pending, *self._dropped]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # a generator still running cannot be closed
        self._pending.clear()
        self._dropped.clear()
        for gen in self._gens:
            await gen.aclose()


async def _next_batch(gen: Batches) -> list[dict[str, Any]] | None:
    return await anext(gen, None)
