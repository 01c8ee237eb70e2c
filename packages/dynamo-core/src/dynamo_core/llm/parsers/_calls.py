"""The state machine most tool-call families share: content, markup that opens calls, a call
header, its arguments, and what closes it.

::

    content --OPEN--> [section] --> head --> body --> trailer --> [section | content]
                                      |                  (calls done: leading whitespace dropped)
                                      +--not a call--> the markup read so far goes out as content

- **content**: text passes through, except a tail that could still be the start of an OPEN
  marker (held until the next piece decides). A family may also open on a character at the very
  start of the output (`BARE`: Llama 3's ``{``).
- **section** (families whose calls sit in a section: DeepSeek, Kimi; Mistral and Llama 3's
  separators): what comes between calls.
- **head**: the call's name (and id), parsed within a fixed window (`MAX_HEAD`): it commits the
  call (`ToolCallStart`) or fails, and a failed head sends the markup read since the last call to
  content, as the model wrote it, then parsing resumes as content. A JSON head whose object is
  not ``{"name": ..., "arguments": {...}`` in that order takes the **slow path** (after an explicit
  marker only): the whole object is buffered, parsed once, and becomes a call or content.
- **body**: the arguments, streamed as the model writes them (a JSON span scanner finds their
  end), or rebuilt as JSON by the XML families.
- **trailer**: what may follow the arguments before the call's end marker (``}``, a code fence);
  other text ends the call without one.

A call that is committed stays a call: if the output stops inside it, its arguments are what was
written (OpenAI sends truncated arguments with ``finish_reason: "length"`` too).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from dynamo_core.llm.parsers._base import (
    JsonSpan,
    Markers,
    Span,
    ToolCallParser,
    loads_strict,
    skip_ws,
)

__all__ = ["FAIL", "NEED", "OK", "SLOW", "CallMachine", "Head", "json_call", "json_header"]

#: Head results: wait for more text, not a call, a JSON object for the slow path, a call.
NEED, FAIL, SLOW, OK = 0, 1, 2, 3

#: (result, name, the model's call id or None, characters consumed up to the arguments)
Head = tuple[int, str, str | None, int]

_NEED: Head = (NEED, "", None, 0)
_FAIL: Head = (FAIL, "", None, 0)

#: Headers longer than this are not headers (decided the same whole or in pieces).
MAX_HEAD = 512

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NEED_POS, _FAIL_POS = -1, -2


def _literal(w: str, p: int, literals: tuple[str, ...]) -> int:
    """After whitespace, one of `literals`: the index past it, `_NEED_POS` or `_FAIL_POS`."""
    p = skip_ws(w, p)
    for lit in literals:
        if w.startswith(lit, p):
            return p + len(lit)
    rest = w[p:]
    if any(len(rest) < len(lit) and lit.startswith(rest) for lit in literals):
        return _NEED_POS
    return _FAIL_POS


_NAME_KEY = ('"name"',)
_ARGS_KEYS = ('"arguments"', '"parameters"')
_COLON = (":",)
_COMMA = (",",)


def json_header(w: str) -> Head:
    """``{"name": "<name>", "arguments" | "parameters": {`` at the start of `w` (whitespace
    allowed): OK with the index of the arguments' ``{``; SLOW (index of the object's ``{``) for
    any other object, or one whose header does not fit the window; FAIL when `w` does not
    start with an object; NEED when undecided."""
    head = _json_header(w)
    if head[0] == NEED and len(w) >= MAX_HEAD:
        obj = skip_ws(w, 0)
        return (SLOW, "", None, obj) if obj < len(w) and w[obj] == "{" else _FAIL
    return head


def _json_header(w: str) -> Head:
    obj = skip_ws(w, 0)
    if obj == len(w):
        return _NEED
    if w[obj] != "{":
        return _FAIL
    slow: Head = (SLOW, "", None, obj)
    p = _literal(w, obj + 1, _NAME_KEY)
    if p >= 0:
        p = _literal(w, p, _COLON)
    if p < 0:
        return _NEED if p == _NEED_POS else slow
    p = skip_ws(w, p)
    if p == len(w):
        return _NEED
    if w[p] != '"':
        return slow
    m = _JSON_STRING.match(w, p)
    if m is None:
        return _NEED
    try:
        name = json.loads(m.group())
    except ValueError:
        return slow
    p = _literal(w, m.end(), _COMMA)
    if p >= 0:
        p = _literal(w, p, _ARGS_KEYS)
    if p >= 0:
        p = _literal(w, p, _COLON)
    if p < 0:
        return _NEED if p == _NEED_POS else slow
    p = skip_ws(w, p)
    if p == len(w):
        return _NEED
    if w[p] != "{" or not name:
        return slow
    return (OK, name, None, p)


def json_call(text: str) -> tuple[str, Any] | None:
    """A whole JSON call object -> (name, arguments), or None if it is not one."""
    try:
        obj = loads_strict(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:  # some models send the arguments already as a JSON string
            loads_strict(args)
        except (ValueError, RecursionError):
            args = json.dumps(args, ensure_ascii=False)
    return name, args


def regex_head(w: str, head: re.Pattern[str], stop: Markers) -> tuple[int, re.Match[str] | None]:
    """Heads that a regex ending in a definite look-ahead recognises. Undecided while neither
    the regex matches nor a `stop` marker (that cannot occur inside a header) has appeared."""
    m = head.match(w)
    if m:
        return OK, m
    if len(w) >= MAX_HEAD or stop.find(w, 0):
        return FAIL, None
    return NEED, None


class CallMachine(ToolCallParser):
    """The shared machine (see the module docstring). Families set the class attributes and
    implement `_head` (and `_section_step` when they have sections, a body when not JSON)."""

    __slots__ = (
        "_after_call",
        "_at_start",
        "_held",
        "_literal",
        "_outer",
        "_section_calls",
        "_slow_ok",
        "_span",
        "_state",
        "_target",
    )

    #: Markers that leave content for tool-call markup.
    OPEN: ClassVar[Markers]
    #: Characters that open markup when the output (after whitespace) starts with them.
    BARE: ClassVar[str] = ""
    #: Whether OPEN starts a section of calls (`_section_step`) rather than one call.
    SECTIONED: ClassVar[bool] = False
    #: A call's end marker, if the family has one.
    CALL_END: ClassVar[Markers | None] = None
    #: What may stand between the arguments and CALL_END.
    TRAILER: ClassVar[re.Pattern[str]] = re.compile(r"\s*")
    #: Whether the arguments sit inside the call's JSON object (hermes, Llama 3, Mistral arrays).
    OUTER_OBJECT: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = self._content_step
        self._at_start = bool(self.BARE)
        self._after_call = False
        self._literal: list[str] = []
        self._held: list[str] = []
        self._section_calls = 0
        self._slow_ok = True
        self._span = JsonSpan()
        self._target = 0
        self._outer = False

    def _step(self, final: bool) -> bool:
        return self._state(final)

    # -- content ---------------------------------------------------------------------------

    def _content_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        n = len(buf)
        if self._after_call:
            pos = self._pos = skip_ws(buf, pos)
            if pos == n:
                return False
            self._after_call = False
        if self._at_start:
            p = skip_ws(buf, pos)
            if p == n:
                if final:
                    self._content(buf[pos:])
                    self._pos = n
                return False
            self._at_start = False
            if buf[p] in self.BARE:
                self._literal = [buf[pos:p]]
                self._pos = p
                self._opened(None)
                return True
        m = self.OPEN.find(buf, pos)
        if m:
            self._content(buf[pos : m.start()])
            self._pos = m.end()
            self._literal = [m.group()]
            self._opened(m.group())
            return True
        end = n if final else self.OPEN.hold(buf, pos)
        self._content(buf[pos:end])
        self._pos = end
        return False

    def _opened(self, marker: str | None) -> None:
        """Markup opened (`marker` None: at a BARE character)."""
        self._slow_ok = marker is not None
        self._section_calls = 0
        self._state = self._section_step if self.SECTIONED else self._head_step

    def _fallback(self) -> bool:
        """Not a call after all: the markup read since the last call goes out as content."""
        self._content("".join(self._literal))
        self._literal = []
        self._state = self._content_step
        return True

    def _section_done(self) -> bool:
        """The section ended without its end marker (other text follows)."""
        if not self._section_calls:
            return self._fallback()
        self._state = self._content_step
        self._after_call = True
        return True

    def _section_step(self, final: bool) -> bool:
        raise NotImplementedError

    # -- head --------------------------------------------------------------------------------

    def _head(self, window: str) -> Head:
        raise NotImplementedError

    def _head_step(self, final: bool) -> bool:
        pos = self._pos
        kind, name, call_id, length = self._head(self._buf[pos : pos + MAX_HEAD])
        if kind == NEED:
            if not final and len(self._buf) - pos < MAX_HEAD:
                return False
            kind = FAIL
        if kind == SLOW and not self._slow_ok:
            kind = FAIL
        if kind == FAIL:
            return self._fallback()
        if kind == SLOW:
            self._literal.append(self._buf[pos : pos + length])
            self._pos = pos + length
            self._span = JsonSpan()
            self._state = self._slow_step
            return True
        self._commit(name, call_id)
        self._pos = pos + length
        self._begin_body()
        return True

    def _commit(self, name: str, call_id: str | None) -> None:
        self._start_call(name, call_id)
        self._literal = []
        self._section_calls += 1

    # -- slow path: a whole JSON object -------------------------------------------------------

    def _take_span(self, span: Span, final: bool) -> str | None:
        """Scan on with `span`; its whole text once it has ended, else None (the text is held;
        if the output ends first, it goes out as content with the markup before it)."""
        buf, pos = self._buf, self._pos
        end = span.scan(buf, pos)
        self._held.append(buf[pos:] if end == -1 else buf[pos:end])
        self._pos = len(buf) if end == -1 else end
        if end == -1:
            if final:
                self._literal.extend(self._held)
                self._held = []
                self._fallback()
            return None
        text = "".join(self._held)
        self._held = []
        return text

    def _slow_step(self, final: bool) -> bool:
        text = self._take_span(self._span, final)
        if text is None:
            return final  # after a fallback at the end, the content step flushes the rest
        call = json_call(text)
        if call is None:
            self._literal.append(text)
            return self._fallback()
        self._literal = []
        self._section_calls += 1
        self._whole_call(*call)
        self._state = self._trailer_step
        return True

    # -- body: JSON arguments, streamed as written --------------------------------------------

    def _outer_object(self) -> bool:
        """Whether this call's arguments sit inside the call's own JSON object."""
        return self.OUTER_OBJECT

    def _begin_body(self) -> None:
        self._outer = self._outer_object()
        depth = 1 if self._outer else 0
        self._span = JsonSpan(depth)
        self._target = depth
        self._state = self._json_args_step

    def _json_args_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        end = self._span.scan(buf, pos, self._target)
        if end == -1:
            self._args(buf[pos:])
            self._pos = len(buf)
            return False
        self._args(buf[pos:end])
        self._pos = end
        self._state = self._outer_step if self._outer else self._trailer_step
        return True

    def _outer_step(self, final: bool) -> bool:
        """The rest of the call's JSON object after its arguments (other keys are dropped)."""
        buf, pos = self._buf, self._pos
        end = self._span.scan(buf, pos, 0)
        if end == -1:
            self._pos = len(buf)
            return False
        self._pos = end
        self._state = self._trailer_step
        return True

    # -- trailer -----------------------------------------------------------------------------

    def _trailer_step(self, final: bool) -> bool:
        buf = self._buf
        m = self.TRAILER.match(buf, self._pos)
        pos = self._pos = m.end() if m else self._pos
        if pos == len(buf) and not final:
            return False  # more trailer may follow
        if not self._end_marker(self.CALL_END, pos, final):
            return False
        return self._call_done()

    def _end_marker(self, end: Markers | None, pos: int, final: bool) -> bool:
        """Consume the end marker at `pos` if there is one; False when more text decides."""
        if end is None:
            return True
        marker = end.at(self._buf, pos)
        if marker == "" and not final:
            return False
        if marker:
            self._pos = pos + len(marker)
        elif marker == "":
            self._pos = len(self._buf)  # a partial end marker at the very end: markup, dropped
        return True

    def _call_done(self) -> bool:
        if self.SECTIONED:
            self._state = self._section_step
        else:
            self._state = self._content_step
            self._after_call = True
        return True

    # -- helpers for sectioned families -----------------------------------------------------

    def _array_item(self, p: int) -> bool:
        """In a JSON array of call objects, at its next non-space character `p`: a call, a comma
        after one, or the closing bracket (then `_array_closed`); anything else ends the section."""
        c = self._buf[p]
        if c == "{":
            self._state = self._head_step
            return True
        if self._section_calls and (c == "," or c == "]"):
            self._pos = p + 1
            if c == ",":
                self._literal.append(c)
                return True
            self._literal = []
            return self._array_closed()
        return self._section_done()

    def _array_closed(self) -> bool:
        """The array of calls has closed: back to content (a family whose array is followed by
        an end marker looks for it first)."""
        self._state = self._content_step
        self._after_call = True
        return True

    def _section_ws(self) -> int:
        """Skip the whitespace before a section's next item (it stays with the markup read so
        far, should the section turn out not to be calls); the item's index."""
        buf, pos = self._buf, self._pos
        p = self._pos = skip_ws(buf, pos)
        self._literal.append(buf[pos:p])
        return p

    def _marker_section(self, final: bool, calls: Markers, end: Markers) -> bool:
        """A section whose calls begin with `calls` markers and that closes with `end`."""
        buf, p = self._buf, self._section_ws()
        marker = calls.at(buf, p)
        if marker:
            self._literal.append(marker)
            self._pos = p + len(marker)
            self._state = self._head_step
            return True
        closing = end.at(buf, p)
        if closing:
            self._pos = p + len(closing)
            self._literal = []
            self._state = self._content_step
            self._after_call = True
            return True
        if marker == "" or closing == "":
            if not final:
                return False
            if self._section_calls:  # the output ends in the section: what is left is markup
                self._pos = len(buf)
                return False
        return self._section_done()
