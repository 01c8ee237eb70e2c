"""Reasoning parsers: split a model's thinking (``reasoning_content``) from its answer.

Every family here marks reasoning with a start and an end marker; they differ in the markers and
in two choices:

- **forced**: the chat template already opened the reasoning in the prompt (DeepSeek-R1,
  Qwen3-Thinking-2507, Kimi K2.5), so the output starts inside it: everything up to the end
  marker is reasoning, with or without a start marker, and all of it when no end marker comes.
  Not forced: reasoning only when the output opens it; otherwise all is content.
- **anywhere**: reasoning blocks may also open later in the output (interleaved thinking
  between tool calls, GLM-4.5, Qwen3); a stray end marker in content is dropped, never shown.
  Granite's phrases count only at the start of the output (they are ordinary English).

A tool-call parser whose markup is made of special tokens (DeepSeek, Kimi) also ends a reasoning
block that the model left open when its markup starts (the model called a tool without closing
``</think>``); the markup then goes to the tool-call parser.

Whitespace around the reasoning and at the start of the content after it is dropped
(``<think>\\n...\\n</think>\\n\\n``): it is held back until the next word shows it is not
the last (no latency in practice: it goes out with that word).
The formats: ``<think>...</think>`` (basic, qwen3, glm45, deepseek_r1 forced), ``[THINK]...
[/THINK]`` (mistral: Magistral), ``◁think▷...◁/think▷`` (kimi), ``Here is my thought process:``
... ``Here is my response:`` (granite, also ``Here's``). gpt_oss reads harmony channels
(`dynamo_core.llm.parsers.harmony`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from dynamo_core.llm.parsers._base import Markers, StreamParser, skip_ws

__all__ = [
    "BASIC",
    "DEEPSEEK_R1",
    "GRANITE",
    "KIMI",
    "KIMI_K25",
    "MISTRAL",
    "ThinkFormat",
    "ThinkParser",
]


@dataclass(frozen=True, slots=True)
class ThinkFormat:
    """One family's reasoning markup (markers compiled once, when the module loads)."""

    starts: Markers
    ends: Markers
    forced: bool
    anywhere: bool
    either: Markers
    #: Tool-call markup that ends a reasoning block left open (it stays in the content for the
    #: tool-call parser), and `stops`: the end markers and these together.
    exits: frozenset[str] = frozenset()
    stops: Markers | None = None

    @classmethod
    def of(
        cls, starts: tuple[str, ...], ends: tuple[str, ...], *, forced: bool, anywhere: bool
    ) -> ThinkFormat:
        return cls(Markers(*starts), Markers(*ends), forced, anywhere, Markers(*starts, *ends))

    def with_exits(self, exits: tuple[str, ...]) -> ThinkFormat:
        """This format, also leaving reasoning at `exits` (built once per pair, then cached)."""
        return _with_exits(self, exits) if exits else self


@functools.lru_cache(maxsize=64)
def _with_exits(fmt: ThinkFormat, exits: tuple[str, ...]) -> ThinkFormat:
    stops = Markers(*fmt.ends.markers, *exits)
    return dataclasses.replace(fmt, exits=frozenset(exits), stops=stops)


BASIC = ThinkFormat.of(("<think>",), ("</think>",), forced=False, anywhere=True)
DEEPSEEK_R1 = ThinkFormat.of(("<think>",), ("</think>",), forced=True, anywhere=True)
MISTRAL = ThinkFormat.of(("[THINK]",), ("[/THINK]",), forced=False, anywhere=True)
KIMI = ThinkFormat.of(("◁think▷",), ("◁/think▷",), forced=False, anywhere=True)
KIMI_K25 = DEEPSEEK_R1
GRANITE = ThinkFormat.of(
    ("Here is my thought process:", "Here's my thought process:"),
    ("Here is my response:", "Here's my response:"),
    forced=False,
    anywhere=False,
)


#: Whitespace dropped before an end marker, at most (held back while streaming, so bounded).
MAX_TRAILING_WS = 64


def _rstrip(buf: str, lo: int, hi: int) -> int:
    """`hi` moved back over at most MAX_TRAILING_WS whitespace characters (not before `lo`)."""
    stop = max(lo, hi - MAX_TRAILING_WS)
    while hi > stop and buf[hi - 1].isspace():
        hi -= 1
    return hi


class ThinkParser(StreamParser):
    """Reasoning between markers, per a `ThinkFormat` (see the module docstring)."""

    __slots__ = ("_fmt", "_fresh", "_state")

    def __init__(self, fmt: ThinkFormat) -> None:
        super().__init__()
        self._fmt = fmt
        self._state = self._start_step
        self._fresh = False

    def _step(self, final: bool) -> bool:
        return self._state(final)

    def _start_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        p = skip_ws(buf, pos)
        if p == len(buf) and not final:
            return False
        marker = self._fmt.starts.at(buf, p)
        if marker == "" and not final:
            return False
        if marker:
            self._pos = p + len(marker)
            self._enter_reasoning()
        elif self._fmt.forced:
            self._enter_reasoning()
        else:
            self._state = self._content_step
        return True

    def _enter_reasoning(self) -> None:
        self._state = self._reasoning_step
        self._fresh = True

    def _skip_fresh(self) -> bool:
        """At the start of a segment, drop its leading whitespace; False if nothing follows yet."""
        if self._fresh:
            self._pos = skip_ws(self._buf, self._pos)
            if self._pos == len(self._buf):
                return False
            self._fresh = False
        return True

    def _reasoning_step(self, final: bool) -> bool:
        if not self._skip_fresh():
            return False
        buf, pos = self._buf, self._pos
        stops = self._fmt.stops or self._fmt.ends
        m = stops.find(buf, pos)
        if m:
            self._reasoning(buf[pos : _rstrip(buf, pos, m.start())])
            exit_to_call = m.group() in self._fmt.exits
            self._pos = m.start() if exit_to_call else m.end()
            self._state = self._content_step
            self._fresh = not exit_to_call
            return True
        if final:
            self._reasoning(buf[pos:])
            self._pos = len(buf)
            return False
        # Hold what could be the end marker, and the whitespace before it (dropped if it is).
        end = _rstrip(buf, pos, stops.hold(buf, pos))
        self._reasoning(buf[pos:end])
        self._pos = end
        return False

    def _content_step(self, final: bool) -> bool:
        if not self._skip_fresh():
            return False
        buf, pos = self._buf, self._pos
        if not self._fmt.anywhere:
            self._content(buf[pos:])
            self._pos = len(buf)
            return False
        either = self._fmt.either
        m = either.find(buf, pos)
        if m:
            self._content(buf[pos : m.start()])
            self._pos = m.end()
            if self._fmt.starts.at(m.group(), 0):
                self._enter_reasoning()
            return True  # a stray end marker is dropped
        end = len(buf) if final else either.hold(buf, pos)
        self._content(buf[pos:end])
        self._pos = end
        return False
