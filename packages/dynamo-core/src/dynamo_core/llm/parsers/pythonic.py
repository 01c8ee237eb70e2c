"""Python-call lists (``pythonic``: Llama 3.2/4, ToolACE and others)::

    [get_weather(city="Paris", unit="celsius"), get_time(zone="CET")]

The list stands at the start of the output, or after Llama 4's ``<|python_start|>`` (and may
end with ``<|python_end|>``). Once ``[name(`` is seen the list is held until its bracket closes
(a scanner that knows Python strings finds it; each character is read once), then parsed once
with `ast`: every element must be a call with keyword arguments whose values are literals
(strings, numbers, booleans, None, lists, dicts; ``true``/``false``/``null`` too). Then each
call is sent whole; anything else (``[see(below)]``, positional arguments, an expression) is
content, as written. Calls are not streamed argument by argument: a list that turns out not to
be calls must still be shown as text. Strings may be triple-quoted (``'''...'''`` or with three
double quotes: code with quotes and newlines in it).
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from dynamo_core.llm.parsers._base import Markers, skip_ws
from dynamo_core.llm.parsers._calls import MAX_HEAD, CallMachine

__all__ = ["PythonicParser", "pythonic_calls"]

_STRUCT = re.compile(r"""[\[\](){}"']""")
_IN_STRING = {"'": re.compile(r"['\\]"), '"': re.compile(r'["\\]')}
_OPENERS = "([{"
_LIST_HEAD = re.compile(r"\[\s*(?:([A-Za-z_][\w.]*)\s*)?")
_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class PySpan:
    """Where a bracketed Python expression ends, fed piece by piece. Strings are skipped, so
    brackets and quotes inside them do not count: ``'...'``, ``"..."``, and triple-quoted ones
    (three single or three double quotes; they may hold lone quotes and newlines), with
    backslash escapes. A run of quotes cut by a piece's end is counted on in the next piece
    (two quotes and something else: an empty string; three: a triple-quoted string opens)."""

    __slots__ = ("closing", "depth", "escaped", "opening", "quote")

    def __init__(self) -> None:
        self.depth = 0
        #: Inside a string: its delimiter (one quote, or three); else "".
        self.quote = ""
        #: Outside strings: the quote characters just read, while it is open how many there are.
        self.opening = ""
        #: Inside a triple-quoted string: how many of the three closing quotes were just read.
        self.closing = 0
        self.escaped = False

    def scan(self, buf: str, pos: int) -> int:
        """Index just past the closing bracket, or -1 (state kept) when the text ends first."""
        n = len(buf)
        if self.escaped:
            if pos >= n:
                return -1
            pos += 1
            self.escaped = False
        while pos < n:
            if self.opening:
                pos = self._open(buf[pos], pos)
                continue
            quote = self.quote
            if quote:
                c = quote[0]
                if self.closing:  # a run of closing quotes goes on, or is broken
                    if buf[pos] == c:
                        self.closing += 1
                        pos += 1
                        if self.closing == 3:
                            self.quote = ""
                            self.closing = 0
                        continue
                    self.closing = 0
                m = _IN_STRING[c].search(buf, pos)
                if m is None:
                    return -1
                pos = m.end()
                if buf[pos - 1] == "\\":
                    if pos >= n:
                        self.escaped = True
                        return -1
                    pos += 1
                elif len(quote) == 1:
                    self.quote = ""
                else:
                    self.closing = 1
                continue
            m = _STRUCT.search(buf, pos)
            if m is None:
                return -1
            pos = m.end()
            c = buf[pos - 1]
            if c in "\"'":
                self.opening = c
            elif c in _OPENERS:
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return pos
        return -1

    def _open(self, c: str, pos: int) -> int:
        """One more character after opening quotes: where scanning goes on."""
        run = self.opening
        if c == run[0]:
            if len(run) == 2:  # a third quote: a triple-quoted string opens
                self.quote = run + c
                self.opening = ""
            else:
                self.opening = run + c
            return pos + 1
        self.opening = ""
        if len(run) == 1:  # a string opens; `c` is its first character
            self.quote = run
        return pos  # two quotes and something else: an empty string; `c` is read as usual


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool | str | int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise ValueError("not a JSON value")
    if isinstance(node, ast.List | ast.Tuple):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            key = _value(k) if k is not None else None
            if not isinstance(key, str):
                raise ValueError("dict keys must be strings")
            out[key] = _value(v)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _value(node.operand)
        if isinstance(inner, bool) or not isinstance(inner, int | float):
            raise ValueError("sign on a non-number")
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    raise ValueError("not a literal")


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def pythonic_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """``[f(a=1), g(b="x")]`` -> [(name, arguments)], or None if the text is not such a list."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for element in tree.body.elts:
        if not isinstance(element, ast.Call) or element.args:
            return None
        name = _dotted(element.func)
        if name is None:
            return None
        args: dict[str, Any] = {}
        for keyword in element.keywords:
            if keyword.arg is None:
                return None
            try:
                args[keyword.arg] = _value(keyword.value)
            except (ValueError, RecursionError):
                return None
        calls.append((name, args))
    return calls


class PythonicParser(CallMachine):
    """A list of Python calls (see the module docstring)."""

    __slots__ = ("_py",)

    OPEN = Markers("<|python_start|>")
    BARE = "["
    CALL_END = Markers("<|python_end|>")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._py = PySpan()

    def _opened(self, marker: str | None) -> None:
        super()._opened(marker)
        self._state = self._list_head_step

    def _list_head_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        p = skip_ws(buf, pos)
        if p == len(buf) and not final:
            return False
        if not buf.startswith("[", p):
            return self._fallback()
        limit = min(len(buf), p + MAX_HEAD)
        m = _LIST_HEAD.match(buf, p, limit)
        assert m is not None  # the pattern matches any "["
        end = m.end()
        if end == limit:  # the head goes on to the end of the text (or of the window)
            if limit == len(buf) and limit - p < MAX_HEAD and not final:
                return False
            return self._fallback()
        if m.group(1) is None or buf[end] != "(":
            return self._fallback()
        self._literal.append(buf[pos:p])
        self._pos = p
        self._py = PySpan()
        self._state = self._list_step
        return True

    def _list_step(self, final: bool) -> bool:
        text = self._take_span(self._py, final)
        if text is None:
            return final
        calls = pythonic_calls(text)
        if calls is None:
            self._literal.append(text)
            return self._fallback()
        self._literal = []
        for name, args in calls:
            self._whole_call(name, args)
        self._state = self._trailer_step
        return True
