"""Arguments written as XML-ish key/value pairs (qwen3_coder, glm45, minimax_m2, DeepSeek V3.2's
DSML), rebuilt as a JSON object.

The model writes every value as bare text, so the JSON type comes from the request's tool
schema: a value declared ``string`` (or any value of a parameter the schema does not know, for
qwen3_coder, as its reference parser does) is streamed as a JSON string while it is written,
escaped piece by piece, holding back only a tail that could be the value's end tag. Any other
value is held until its end tag and converted once (``integer`` -> int, ``boolean`` ->
true/false, ``object``/``array`` -> JSON or a Python literal, ``null``/``None`` -> null; a value
that does not convert stays a string). The JSON is emitted as ``{`` at the call's start,
``"key": value`` per parameter, ``}`` at its end, so the fragments always concatenate to a
valid object, even when the output stops inside a call (the object is closed at `finish`).

A family may read the parameter's name from attributes (`_read_key`), type a value itself
(DSML's ``string="true|false"``: `_streams`, `_convert`), and refuse an end tag that the text
after it shows to be part of the value (`_ends_value`: qwen3_coder).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from dynamo_core.llm.parsers._base import Markers, loads_strict, skip_ws
from dynamo_core.llm.parsers._calls import CallMachine

__all__ = ["XmlArgsMachine", "convert_value"]

_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
_NULLS = ("null", "none")
_MAX_KEY = 256


def _schema_type(spec: Any) -> tuple[str | None, bool]:
    """(the declared type, whether null is allowed) of one property's JSON schema."""
    if not isinstance(spec, Mapping):
        return None, False
    declared = spec.get("type")
    if isinstance(declared, str):
        return declared.strip().lower(), declared.strip().lower() == "null"
    if isinstance(declared, list):
        types = [str(t).lower() for t in declared]
        rest = [t for t in types if t != "null"]
        return (rest[0] if rest else "null"), "null" in types
    for key in ("anyOf", "oneOf"):
        options = spec.get(key)
        if isinstance(options, list):
            types = [str(o.get("type")).lower() for o in options if isinstance(o, Mapping)]
            rest = [t for t in types if t not in ("null", "none")]
            return (rest[0] if rest else None), "null" in types
    if isinstance(spec.get("enum"), list) and all(isinstance(v, str) for v in spec["enum"]):
        return "string", False
    return None, False


def _literal_value(text: str) -> Any:
    """JSON, else a Python literal that JSON can carry, else the text itself."""
    try:
        return loads_strict(text)
    except (ValueError, RecursionError):
        pass
    try:
        value = ast.literal_eval(text)
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text
    return value


def _number(text: str, integer: bool) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    if integer:
        return text
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def convert_value(raw: str, spec: Any, *, untyped_json: bool) -> Any:
    """The JSON value of a parameter written as `raw` text, given its schema `spec` (None when
    the schema does not declare it): see the module docstring."""
    declared, nullable = _schema_type(spec)
    text = raw.strip()
    if declared is None:
        return _literal_value(text) if untyped_json else raw
    if nullable and text.lower() in _NULLS:
        return None
    if declared in _STRING_TYPES:
        return raw
    if text.lower() in _NULLS:
        return None
    if declared.startswith(("int", "uint", "long", "short")):
        return _number(text, integer=True)
    if declared.startswith(("num", "float", "double")):
        return _number(text, integer=False)
    if declared in ("boolean", "bool"):
        low = text.lower()
        return low == "true" if low in ("true", "false") else raw
    return _literal_value(text)


def streams_as_string(spec: Any, *, untyped_json: bool) -> bool:
    """Whether a value can be streamed as a JSON string while it is written."""
    declared, nullable = _schema_type(spec)
    if declared is None:
        return not untyped_json
    return declared in _STRING_TYPES and not nullable


def _escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


class XmlArgsMachine(CallMachine):
    """`CallMachine` whose body is key/value markup (see the module docstring)."""

    __slots__ = ("_call_name", "_fresh", "_key", "_params", "_props", "_ws")

    #: What opens a parameter, and what ends its key.
    PARAM_OPEN: ClassVar[str]
    KEY_END: ClassVar[str]
    #: What opens the value after the key, if anything (glm45's ``<arg_value>``).
    VALUE_OPEN: ClassVar[Markers | None] = None
    #: What ends a value; those in VALUE_END_CONSUMED belong to the value, the others start
    #: what comes next. `_ends_value` may refuse one (it is then text of the value).
    VALUE_END: ClassVar[Markers]
    VALUE_END_CONSUMED: ClassVar[frozenset[str]]
    #: Parameter openers and body ends, looked for between parameters.
    BETWEEN: ClassVar[Markers]
    BODY_END_CONSUMED: ClassVar[frozenset[str]]
    #: Whitespace around a value that is not part of it: ``keep`` none, ``newline`` one newline
    #: after the key and one before the end tag (qwen3_coder writes values on their own lines),
    #: ``strip`` all of it (minimax_m2).
    VALUE_WS: ClassVar[str] = "keep"
    #: How a value the schema does not type is read: as JSON/a literal (glm45) or as text.
    UNTYPED_JSON: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._call_name = ""
        self._props: Mapping[str, Any] | None = None
        self._key = ""
        self._params = 0
        self._fresh = False
        self._ws: list[str] = []

    def _commit(self, name: str, call_id: str | None) -> None:
        super()._commit(name, call_id)
        self._call_name = name

    def _begin_body(self) -> None:
        self._props = self._schemas.properties(self._call_name)
        self._params = 0
        self._args("{")
        self._state = self._between_step

    def _close_args(self) -> bool:
        self._args("}")
        self._state = self._trailer_step
        return True

    # -- hooks a family may override ----------------------------------------------------------

    def _read_key(self, raw: str) -> str | None:
        """The parameter's name from the text between PARAM_OPEN and KEY_END (None: not one)."""
        return raw.strip()

    def _streams(self, spec: Any) -> bool:
        """Whether this value is streamed as a JSON string while it is written."""
        return streams_as_string(spec, untyped_json=self.UNTYPED_JSON)

    def _convert(self, raw: str, spec: Any) -> Any:
        """The JSON value of a value held whole."""
        return convert_value(raw, spec, untyped_json=self.UNTYPED_JSON)

    def _ends_value(self, buf: str, m: re.Match[str], final: bool) -> bool | None:
        """Whether the VALUE_END marker `m` ends the value (None: more text decides)."""
        return True

    # -- the body ---------------------------------------------------------------------------

    def _between_step(self, final: bool) -> bool:
        buf = self._buf
        p = skip_ws(buf, self._pos)
        m = self.BETWEEN.find(buf, p)
        if m is None:
            self._pos = len(buf) if final else self.BETWEEN.hold(buf, p)  # stray text: dropped
            return self._close_args() if final else False
        marker = m.group()
        if marker == self.PARAM_OPEN:
            self._pos = m.end()
            self._state = self._key_step
            return True
        self._pos = m.end() if marker in self.BODY_END_CONSUMED else m.start()
        return self._close_args()

    def _key_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        i = buf.find(self.KEY_END, pos, pos + _MAX_KEY)
        if i == -1:
            if not final and len(buf) - pos < _MAX_KEY:
                return False
            return self._close_args()  # no key: the call ends here
        key = self._read_key(buf[pos:i])
        if key is None:
            return self._close_args()
        self._key = key
        self._pos = i + len(self.KEY_END)
        self._state = self._value_open_step if self.VALUE_OPEN else self._value_start
        return True

    def _value_open_step(self, final: bool) -> bool:
        assert self.VALUE_OPEN is not None
        buf = self._buf
        p = skip_ws(buf, self._pos)
        marker = self.VALUE_OPEN.at(buf, p)
        if marker == "" and not final:
            return False
        if not marker:
            return self._close_args()
        self._pos = p + len(marker)
        return self._value_start(final)

    def _value_start(self, final: bool) -> bool:
        spec = self._props.get(self._key) if self._props is not None else None
        if self._streams(spec):
            self._args(self._key_prefix() + '"')
            self._fresh = self.VALUE_WS != "keep"
            self._ws = []
            self._state = self._string_value_step
        else:
            self._state = self._held_value_step
        return True

    def _key_prefix(self) -> str:
        self._params += 1
        sep = ", " if self._params > 1 else ""
        return f"{sep}{json.dumps(self._key, ensure_ascii=False)}: "

    def _value_end(self, buf: str, pos: int, final: bool) -> tuple[int, int]:
        """Where the value written from `pos` ends and where parsing resumes after it; or
        (-1, h): the text so far does not end it, and it goes on at least to `h`."""
        while True:
            m = self.VALUE_END.find(buf, pos)
            if m is None:
                n = len(buf)
                return (n, n) if final else (-1, self.VALUE_END.hold(buf, pos))
            ends = self._ends_value(buf, m, final)
            if ends is None:
                return -1, m.start()
            if ends:
                consumed = m.group() in self.VALUE_END_CONSUMED
                return m.start(), m.end() if consumed else m.start()
            pos = m.end()  # the marker's text belongs to the value

    def _skip_leading_ws(self, final: bool) -> bool:
        """Drop the whitespace a value starts with that is not part of it (False: wait)."""
        buf, pos = self._buf, self._pos
        if self.VALUE_WS == "strip":
            pos = self._pos = skip_ws(buf, pos)
        if pos == len(buf) and not final:
            return False
        if self.VALUE_WS == "newline" and buf.startswith("\n", pos):
            self._pos = pos + 1
        self._fresh = False
        return True

    def _string_text(self, text: str, last: bool) -> None:
        """Stream a piece of a string value; whitespace that may turn out to be the value's
        trailing whitespace (dropped) is held back (`_ws`) until text follows it."""
        mode = self.VALUE_WS
        if mode == "newline":
            if self._ws:  # the one newline held back was not the last
                text = "\n" + text
                self._ws = []
            if text.endswith("\n"):
                text = text[:-1]
                if not last:
                    self._ws = ["\n"]
        elif mode == "strip":
            body = text.rstrip()
            tail = text[len(body) :]
            if body and self._ws:  # the whitespace held back was not the last
                body = "".join(self._ws) + body
                self._ws = []
            if tail and not last:
                self._ws.append(tail)
            text = body
        if text:
            self._args(_escape(text))

    def _string_value_step(self, final: bool) -> bool:
        if self._fresh and not self._skip_leading_ws(final):
            return False
        buf, pos = self._buf, self._pos
        start, resume = self._value_end(buf, pos, final)
        if start == -1:
            self._string_text(buf[pos:resume], last=False)
            self._pos = resume
            return False
        self._string_text(buf[pos:start], last=True)
        self._ws = []
        self._args('"')
        self._pos = resume
        self._state = self._between_step
        return True

    def _held_value_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        start, resume = self._value_end(buf, pos, final)
        if start == -1:
            self._held.append(buf[pos:resume])
            self._pos = resume
            return False
        self._held.append(buf[pos:start])
        raw = "".join(self._held)
        self._held = []
        if self.VALUE_WS == "newline":
            raw = raw.removeprefix("\n").removesuffix("\n")
        elif self.VALUE_WS == "strip":
            raw = raw.strip()
        spec = self._props.get(self._key) if self._props is not None else None
        value = self._convert(raw, spec)
        self._args(self._key_prefix() + json.dumps(value, ensure_ascii=False))
        self._pos = resume
        self._state = self._between_step
        return True
