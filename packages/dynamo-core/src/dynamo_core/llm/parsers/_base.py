"""What every parser shares: the events, the aggregated result, the stream-parser base, and the
small scanners the families are built from (marker search with hold-back, a JSON span scanner,
tool schemas, call ids).

Two rules hold for every parser built on `StreamParser`:

1. **Decisions depend on the text only, never on where a chunk ends.** A state either decides
   from the text it has, or waits (returns without consuming) until more text or `finish()`
   decides. Bounded look-ahead (a tool-call header, a harmony message header) is cut at a fixed
   window, so a long header is refused the same way whole or in pieces. This is what makes
   incremental and whole-text parsing agree for every split of the text.
2. **Each character is looked at a bounded number of times.** The unconsumed text `_buf[_pos:]`
   is only what could still become markup (a partial marker, at most a header window); text a
   state must keep whole (a buffered argument value, a Python call list) moves to `_held` chunks
   as it is scanned, with the scanner's state carried over, so a feed costs O(its own length).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

__all__ = [
    "Content",
    "Event",
    "Markers",
    "ParsedOutput",
    "Reasoning",
    "Span",
    "StreamParser",
    "ToolCall",
    "ToolCallArguments",
    "ToolCallParser",
    "ToolCallStart",
    "ToolSchemas",
    "collect",
    "loads_strict",
    "mistral_call_id",
    "new_call_id",
]


@dataclass(frozen=True, slots=True)
class Content:
    """Text for the message's `content`."""

    text: str


@dataclass(frozen=True, slots=True)
class Reasoning:
    """Text for the message's `reasoning_content`."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call begins: OpenAI's first `tool_calls` delta (index, id, type, function name)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArguments:
    """A fragment of a call's `function.arguments`; the fragments concatenate to the whole."""

    index: int
    text: str


Event = Content | Reasoning | ToolCallStart | ToolCallArguments


@dataclass(slots=True)
class ToolCall:
    """One parsed call, as a non-streaming response carries it."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ParsedOutput:
    """The whole output, split: content, reasoning, tool calls (in order)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def collect(events: Iterable[Event]) -> ParsedOutput:
    """Aggregate events (of a whole stream) into a `ParsedOutput`."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, tuple[str, str, list[str]]] = {}
    for event in events:
        if isinstance(event, Content):
            content.append(event.text)
        elif isinstance(event, Reasoning):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = (event.id, event.name, [])
        else:
            calls[event.index][2].append(event.text)
    return ParsedOutput(
        content="".join(content),
        reasoning="".join(reasoning),
        tool_calls=[
            ToolCall(id=call_id, name=name, arguments="".join(parts))
            for _, (call_id, name, parts) in sorted(calls.items())
        ],
    )


def new_call_id() -> str:
    """A tool-call id shaped like OpenAI's: ``call_`` and 24 random hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def mistral_call_id() -> str:
    """Mistral's chat templates accept only 9 alphanumeric characters as a tool-call id."""
    n = uuid.uuid4().int
    chars = []
    for _ in range(9):
        n, r = divmod(n, 62)
        chars.append(_ALNUM[r])
    return "".join(chars)


def append_event(out: list[Event], event: Event) -> None:
    """Append, merging with the previous event when both are text of the same kind/call."""
    if out:
        last = out[-1]
        kind = type(event)
        if kind is type(last):
            if kind is Content or kind is Reasoning:
                out[-1] = kind(last.text + event.text)  # type: ignore[union-attr]
                return
            if kind is ToolCallArguments and last.index == event.index:  # type: ignore[union-attr]
                out[-1] = ToolCallArguments(last.index, last.text + event.text)  # type: ignore[union-attr]
                return
    out.append(event)


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} does not fit a JSON number")
    return value


def loads_strict(text: str) -> Any:
    """`json.loads` that refuses NaN, Infinity and numbers that overflow a double (Python's
    parser takes them, and `json.dumps` would send them on as invalid JSON)."""
    return json.loads(text, parse_constant=_not_json, parse_float=_finite)


_NON_WS = re.compile(r"\S")


def skip_ws(buf: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after `pos` (len(buf) if none)."""
    m = _NON_WS.search(buf, pos)
    return m.start() if m else len(buf)


class Markers:
    """A fixed set of literal markers: find the first, tell whether a tail could still be one.

    The alternation is compiled once, when the family's class is defined; `find` is one regex
    search and `hold` a `str.find` per distinct first character, so the common case (text with
    no marker character at its end) costs two or three C calls per feed.
    """

    __slots__ = ("_firsts", "_longest", "_re", "markers")

    def __init__(self, *markers: str) -> None:
        self.markers = markers
        ordered = sorted(markers, key=len, reverse=True)
        self._re = re.compile("|".join(re.escape(m) for m in ordered))
        self._firsts = "".join(sorted({m[0] for m in markers}))
        self._longest = len(ordered[0])

    def find(self, buf: str, pos: int) -> re.Match[str] | None:
        """The first marker in `buf[pos:]`."""
        return self._re.search(buf, pos)

    def hold(self, buf: str, pos: int) -> int:
        """Where the longest tail of `buf[pos:]` that is a proper prefix of a marker begins
        (`len(buf)` when no tail could still become a marker)."""
        n = len(buf)
        lo = max(pos, n - self._longest + 1)
        best = n
        for c in self._firsts:
            j = buf.find(c, lo)
            while j != -1 and j < best:
                tail = buf[j:]
                if any(len(tail) < len(m) and m.startswith(tail) for m in self.markers):
                    best = j
                    break
                j = buf.find(c, j + 1)
        return best

    def at(self, buf: str, pos: int) -> str | None:
        """The marker that starts exactly at `pos`; ``""`` when `buf[pos:]` is still a prefix
        of one (more text decides); None when no marker starts there."""
        m = self._re.match(buf, pos)
        if m:
            return m.group()
        tail = buf[pos : pos + self._longest]
        if any(len(tail) < len(m) and m.startswith(tail) for m in self.markers):
            return ""
        return None


_JSON_STRUCT = re.compile(r'[{}\[\]"]')
_JSON_IN_STRING = re.compile(r'["\\]')


class JsonSpan:
    """Finds where a JSON object or array ends, one piece of text at a time.

    Tracks bracket depth outside strings, and string/escape state, across pieces; each
    character is scanned once. It does not validate: a caller that needs the value parses the
    whole span once it has ended (`json.loads`), or streams it as the model wrote it.
    """

    __slots__ = ("depth", "escaped", "in_string")

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.in_string = False
        self.escaped = False

    def scan(self, buf: str, pos: int, target: int = 0) -> int:
        """Scan `buf[pos:]`; return the index just past the bracket that brings the depth back
        down to `target`, or -1 when the text ends first (the state is kept)."""
        n = len(buf)
        if self.escaped:
            if pos >= n:
                return -1
            pos += 1
            self.escaped = False
        depth = self.depth
        in_string = self.in_string
        while pos < n:
            if in_string:
                m = _JSON_IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.end()
                if buf[pos - 1] == '"':
                    in_string = False
                elif pos >= n:
                    self.escaped = True
                else:
                    pos += 1
            else:
                m = _JSON_STRUCT.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.end()
                c = buf[pos - 1]
                if c == '"':
                    in_string = True
                elif c == "{" or c == "[":
                    depth += 1
                else:
                    depth -= 1
                    if depth <= target:
                        self.depth = depth
                        self.in_string = False
                        return pos
        self.depth = depth
        self.in_string = in_string
        return -1


class Span(Protocol):
    """A scanner that finds where a bracketed value ends, one piece of text at a time."""

    def scan(self, buf: str, pos: int) -> int: ...


class ToolSchemas:
    """The request's tools, by function name: parameter schemas for the XML families, which
    write every value as text and need the declared type to rebuild JSON.

    Accepts Chat Completions tools (``{"type": "function", "function": {...}}``) and the flat
    Responses-API shape (``{"type": "function", "name": ..., "parameters": ...}``). Built on
    first use: a request whose output has no XML call never pays for it.
    """

    __slots__ = ("_by_name", "_tools")

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None) -> None:
        self._tools = tools or ()
        self._by_name: dict[str, Mapping[str, Any]] | None = None

    def properties(self, name: str) -> Mapping[str, Any] | None:
        """The JSON-schema `properties` of function `name`, or None if no such tool."""
        if self._by_name is None:
            self._by_name = {}
            for tool in self._tools:
                fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
                if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                    params = fn.get("parameters")
                    props = params.get("properties") if isinstance(params, Mapping) else None
                    self._by_name[fn["name"]] = props if isinstance(props, Mapping) else {}
        return self._by_name.get(name)


class StreamParser:
    """Base of every parser: `feed(delta) -> events`, `finish() -> events`, `parse(text)`.

    A subclass implements `_step(final)`: do one piece of work on ``self._buf[self._pos:]``,
    return True to be called again, False when it needs more text (or, with ``final``, when it
    has flushed what it held).
    """

    __slots__ = ("_buf", "_finished", "_out", "_pos")

    def __init__(self) -> None:
        self._buf = ""
        self._pos = 0
        self._out: list[Event] = []
        self._finished = False

    def feed(self, text: str) -> list[Event]:
        """Parse the next piece of the output; return the events it completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf = self._buf[self._pos :] + text if self._pos else self._buf + text
        self._pos = 0
        return self._run(False)

    def finish(self) -> list[Event]:
        """The output has ended: flush what was held back (incomplete markup becomes content)."""
        if self._finished:
            return []
        self._finished = True
        return self._run(True)

    def parse(self, text: str) -> ParsedOutput:
        """The whole output at once (the same code path as streaming)."""
        events = self.feed(text)
        events.extend(self.finish())
        return collect(events)

    def _run(self, final: bool) -> list[Event]:
        out = self._out = []
        while self._step(final):
            pass
        return out

    def _step(self, final: bool) -> bool:
        raise NotImplementedError

    def _content(self, text: str) -> None:
        if text:
            append_event(self._out, Content(text))

    def _reasoning(self, text: str) -> None:
        if text:
            append_event(self._out, Reasoning(text))


class ToolCallParser(StreamParser):
    """A stream parser that also emits tool calls, numbered from 0 in order."""

    __slots__ = ("_call_id", "_index", "_schemas")

    #: The ids a family's chat template expects; OpenAI-shaped unless the family says otherwise.
    default_call_id: ClassVar[Callable[[], str]] = new_call_id

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        call_id: Callable[[], str] | None = None,
    ) -> None:
        super().__init__()
        self._schemas = ToolSchemas(tools)
        self._call_id = call_id or type(self).default_call_id
        self._index = -1

    def _start_call(self, name: str, call_id: str | None = None) -> None:
        self._index += 1
        self._out.append(ToolCallStart(self._index, call_id or self._call_id(), name))

    def _args(self, text: str) -> None:
        if text:
            append_event(self._out, ToolCallArguments(self._index, text))

    def _whole_call(self, name: str, arguments: Any, call_id: str | None = None) -> None:
        """A call parsed whole: start it and send its arguments as one JSON string."""
        self._start_call(name, call_id)
        self._args(
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        )
