"""Tool-call parsers of the families that mark calls with tags and JSON or key/value arguments.

Each class is one family's markup on `CallMachine` (see `_calls` for the shared machine). The
formats, from each family's chat template and reference parser:

- **hermes** (Qwen 2.5/3, QwQ, Hermes 2 Pro/3)::

      text<tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- **llama3_json** (Llama 3.1/3.2/3.3): the output is one or more JSON objects separated by
  ``;``, optionally after ``<|python_tag|>``, with ``"parameters"`` (or ``"arguments"``)::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

- **granite** (Granite 3.x): ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]`` (3.1+
  also ``<tool_call>[...]``); Granite 4 writes each call as hermes does. **phi4** (Phi-4-mini):
  ``functools[...]``; **jamba**: ``<tool_calls>[...]</tool_calls>``; **nemotron_deci**
  (Llama-Nemotron): ``<TOOLCALL>[...]</TOOLCALL>``, brackets optional. The calls stream as
  the model writes them, as hermes' do.
- **mistral**: ``[TOOL_CALLS]`` then, up to tokenizer v3 (Mistral 7B v0.3, Nemo, Small 2501), a
  JSON array ``[{"name": ..., "arguments": {...}}, ...]``; from v11 (Small 3.1+, Magistral,
  Devstral) one ``[TOOL_CALLS]name[ARGS]{...}`` per call, v13 adding ``[CALL_ID]id`` before
  ``[ARGS]``. Ids are 9 alphanumerics, as Mistral's templates require.
- **deepseek_v3** (V3, R1, R1-0528)::

      <|tool▁calls▁begin|><|tool▁call▁begin|>function<|tool▁sep|>get_weather
      ```json
      {"city": "Paris"}
      ```<|tool▁call▁end|><|tool▁calls▁end|>

  (the bars in DeepSeek's markers are U+FF5C FULLWIDTH VERTICAL LINE, the spaces U+2581)
- **deepseek_v3_1** (V3.1): ``<|tool▁call▁begin|>get_weather<|tool▁sep|>{"city": "Paris"}
  <|tool▁call▁end|>`` in the same section.
- **kimi_k2**: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
  <|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>``
  (also the singular ``<|tool_call_section_begin|>``); the call id is the model's own
  (``functions.get_weather:0``), which Kimi's template expects back.
- **qwen3_coder** (Qwen3-Coder, Qwen3.5)::

      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>

- **glm45** (GLM-4.5/4.6; GLM-4.7 without the newlines)::

      <tool_call>get_weather
      <arg_key>city</arg_key>
      <arg_value>Paris</arg_value>
      </tool_call>

- **deepseek_v3_2** (DeepSeek V3.2's DSML; ``|`` is U+FF5C in the tags)::

      <|DSML|function_calls>
      <|DSML|invoke name="get_weather">
      <|DSML|parameter name="city" string="true">Paris</|DSML|parameter>
      <|DSML|parameter name="days" string="false">3</|DSML|parameter>
      </|DSML|invoke>
      </|DSML|function_calls>

- **minimax_m2** (MiniMax-M2)::

      <minimax:tool_call>
      <invoke name="get_weather">
      <parameter name="city">Paris</parameter>
      </invoke>
      </minimax:tool_call>

The markup is made of special tokens in most of these models: the text given to the parser must
be decoded with ``skip_special_tokens=False`` (vLLM's parsers set the same on the request).
"""

from __future__ import annotations

import re
from typing import ClassVar

from dynamo_core.llm.parsers._base import Markers, mistral_call_id, skip_ws
from dynamo_core.llm.parsers._calls import (
    FAIL,
    NEED,
    OK,
    CallMachine,
    Head,
    json_header,
    regex_head,
)
from dynamo_core.llm.parsers._xml import XmlArgsMachine

__all__ = [
    "DeepSeekV3Parser",
    "DeepSeekV31Parser",
    "DeepSeekV32Parser",
    "Glm45Parser",
    "GraniteParser",
    "HermesParser",
    "JambaParser",
    "KimiK2Parser",
    "Llama3JsonParser",
    "MiniMaxM2Parser",
    "MistralParser",
    "NemotronParser",
    "Phi4Parser",
    "Qwen3CoderParser",
]

_NEED: Head = (NEED, "", None, 0)
_FAIL: Head = (FAIL, "", None, 0)
_NON_SPACE = re.compile(r"\S")


class HermesParser(CallMachine):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them."""

    __slots__ = ()

    OPEN = Markers("<tool_call>")
    CALL_END = Markers("</tool_call>")
    OUTER_OBJECT = True

    def _head(self, window: str) -> Head:
        return json_header(window)


class Llama3JsonParser(CallMachine):
    """JSON call objects at the start of the output or after ``<|python_tag|>``, ``;``-separated."""

    __slots__ = ()

    OPEN = Markers("<|python_tag|>")
    BARE = "{"
    SECTIONED = True
    OUTER_OBJECT = True

    def _head(self, window: str) -> Head:
        return json_header(window)

    def _section_step(self, final: bool) -> bool:
        buf, p = self._buf, self._section_ws()
        if p < len(buf) and buf[p] == ";" and self._section_calls:
            self._literal.append(";")
            self._pos = p + 1
            return True
        if p < len(buf) and buf[p] == "{":
            self._state = self._head_step
            return True
        marker = self.OPEN.at(buf, p)
        if marker:
            self._literal.append(marker)
            self._pos = p + len(marker)
            self._slow_ok = True
            return True
        if marker == "" and not final:
            return False
        if marker == "" and self._section_calls:
            self._pos = len(buf)  # the output ends in markup after the calls
            return False
        return self._section_done()


class _JsonListParser(CallMachine):
    """A marker, then a JSON array of call objects ``[{"name": ..., "arguments": {...}}, ...]``
    (or, where the family writes them so, call objects one after another, comma-separated or
    not), then the family's end marker if it has one. An empty or broken list is content.
    (granite, phi4, jamba, nemotron_deci; mistral, whose calls without brackets are its own.)"""

    __slots__ = ("_array",)

    SECTIONED = True
    OUTER_OBJECT = True
    #: What closes the calls, if anything.
    LIST_END: ClassVar[Markers | None] = None
    #: Whether calls may stand without the brackets.
    OBJECTS: ClassVar[bool] = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._array: bool | None = None

    def _opened(self, marker: str | None) -> None:
        super()._opened(marker)
        self._array = None

    def _head(self, window: str) -> Head:
        return json_header(window)

    def _section_step(self, final: bool) -> bool:
        buf, p = self._buf, self._section_ws()
        if p == len(buf):
            if not final:
                return False
            return self._section_done() if not self._section_calls else False
        if self._array is None:  # just after the marker: an array, or not?
            self._array = buf[p] == "["
            if self._array:
                self._literal.append("[")
                self._pos = p + 1
                return True
        if self._array:
            return self._array_item(p)
        return self._bare_item(p, final)

    def _bare_item(self, p: int, final: bool) -> bool:
        """Calls without brackets (OBJECTS), at the next non-space character `p`: a call
        object, a comma after one, or what follows the calls."""
        c = self._buf[p]
        if not self.OBJECTS:
            return self._section_done()
        if c == "{":
            self._state = self._head_step
            return True
        if c == "," and self._section_calls:
            self._literal.append(c)
            self._pos = p + 1
            return True
        if not self._section_calls:
            return self._section_done()
        return self._array_closed()  # their end marker, or other text

    def _array_closed(self) -> bool:
        self._literal = []
        self._state = self._list_end_step
        return True

    def _list_end_step(self, final: bool) -> bool:
        """After the calls: the end marker, when it follows (whitespace before it is dropped)."""
        if not self._end_marker(self.LIST_END, skip_ws(self._buf, self._pos), final):
            return False
        self._state = self._content_step
        self._after_call = True
        return True


class GraniteParser(_JsonListParser):
    """Granite 3.x: ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]`` (3.1+ may write
    ``<tool_call>`` instead); Granite 4: ``<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`` per call, as hermes."""

    __slots__ = ()

    OPEN = Markers("<|tool_call|>", "<tool_call>")
    LIST_END = Markers("</tool_call>")
    OBJECTS = True


class Phi4Parser(_JsonListParser):
    """Phi-4-mini: ``functools[{"name": ..., "arguments": {...}}, ...]``."""

    __slots__ = ()

    OPEN = Markers("functools")


class JambaParser(_JsonListParser):
    """Jamba: ``<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>``."""

    __slots__ = ()

    OPEN = Markers("<tool_calls>")
    LIST_END = Markers("</tool_calls>")


class NemotronParser(_JsonListParser):
    """Llama-Nemotron: ``<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`` (the
    brackets may be missing)."""

    __slots__ = ()

    OPEN = Markers("<TOOLCALL>")
    LIST_END = Markers("</TOOLCALL>")
    OBJECTS = True


_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]+")
_ARGS = "[ARGS]"
_CALL_ID = "[CALL_ID]"


def _mistral_v11_head(w: str) -> Head:
    """``name[ARGS]{``, ``name[CALL_ID]id[ARGS]{``, or ``name{`` when the text was decoded
    without the control tokens."""
    p = skip_ws(w, 0)
    m = _MISTRAL_NAME.match(w, p)
    if m is None:
        return _NEED if p == len(w) else _FAIL
    name, q = m.group(), m.end()
    if q == len(w):
        return _NEED
    call_id = None
    if w.startswith(_CALL_ID, q):
        m = _MISTRAL_ID.match(w, q + len(_CALL_ID))
        if m is None:
            return _NEED if q + len(_CALL_ID) == len(w) else _FAIL
        if m.end() == len(w):
            return _NEED
        call_id, q = m.group(), m.end()
        if not w.startswith(_ARGS, q):
            return _NEED if _ARGS.startswith(w[q:]) else _FAIL
    if w.startswith(_ARGS, q):
        q += len(_ARGS)
    else:
        rest = w[q:]
        if any(len(rest) < len(tag) and tag.startswith(rest) for tag in (_ARGS, _CALL_ID)):
            return _NEED
    q = skip_ws(w, q)
    if q == len(w):
        return _NEED
    return (OK, name, call_id, q) if w[q] == "{" else _FAIL


class MistralParser(_JsonListParser):
    """``[TOOL_CALLS]`` followed by a JSON array of calls (tokenizers up to v3) or by one
    ``name[ARGS]{...}`` per ``[TOOL_CALLS]`` (v11+), told apart by the first character."""

    __slots__ = ()

    OPEN = Markers("[TOOL_CALLS]")
    default_call_id = mistral_call_id

    def _head(self, window: str) -> Head:
        return json_header(window) if self._array else _mistral_v11_head(window)

    def _outer_object(self) -> bool:
        return bool(self._array)  # array elements are call objects; v11 arguments stand alone

    def _bare_item(self, p: int, final: bool) -> bool:
        """v11: the first call's name just after the marker; then ``[TOOL_CALLS]`` per call."""
        if not self._section_calls:
            self._state = self._head_step
            return True
        buf = self._buf
        marker = self.OPEN.at(buf, p)
        if marker:
            self._literal.append(marker)
            self._pos = p + len(marker)
            self._state = self._head_step
            return True
        if marker == "" and not final:
            return False
        if marker == "":
            self._pos = len(buf)
            return False
        return self._section_done()


class _TokenSectionParser(CallMachine):
    """Calls inside a section of special tokens (DeepSeek, Kimi; the ``<invoke>`` families):
    each opens with SECTION_CALL and a header that HEAD reads."""

    __slots__ = ()

    SECTIONED = True
    SECTION_CALL: ClassVar[Markers]
    SECTION_END: ClassVar[Markers]
    #: Markers that cannot occur inside a call's head: seeing one decides a head that failed.
    HEAD_STOP: ClassVar[Markers]
    HEAD: ClassVar[re.Pattern[str]]

    def _section_step(self, final: bool) -> bool:
        return self._marker_section(final, self.SECTION_CALL, self.SECTION_END)

    def _head(self, window: str) -> Head:
        kind, m = regex_head(window, self.HEAD, self.HEAD_STOP)
        if m is None:
            return (kind, "", None, 0)
        name, call_id = self._name_and_id(m)
        return (OK, name, call_id, m.end()) if name else _FAIL

    def _name_and_id(self, m: re.Match[str]) -> tuple[str, str | None]:
        return m.group(1).strip(), None


def _ds(name: str) -> str:
    """A DeepSeek marker: ``<|tool_calls_begin|>`` written with U+FF5C bars and U+2581 spaces."""
    return "<\uff5c" + name.replace("_", "\u2581") + "\uff5c>"


_DS_CALLS = _ds("tool_calls_begin")
_DS_CALLS_END = _ds("tool_calls_end")
_DS_CALL = _ds("tool_call_begin")
_DS_CALL_END = _ds("tool_call_end")
_DS_SEP = _ds("tool_sep")


class _DeepSeekParser(_TokenSectionParser):
    """DeepSeek's section and call markers (the head differs by version)."""

    __slots__ = ()

    OPEN = Markers(_DS_CALLS)
    SECTION_CALL = Markers(_DS_CALL)
    SECTION_END = Markers(_DS_CALLS_END)
    HEAD_STOP = Markers(_DS_CALL, _DS_CALL_END, _DS_CALLS_END)
    CALL_END = Markers(_DS_CALL_END)


class DeepSeekV3Parser(_DeepSeekParser):
    """DeepSeek V3/R1: ``function<|tool_sep|>NAME`` and the arguments in a json code fence."""

    __slots__ = ()

    TRAILER = re.compile(r"[\s`]*")
    HEAD = re.compile(r"\s*function\s*" + _DS_SEP + r"\s*([^\n<]+?)\s*```(?:json)?\s*(?=\{)")


class DeepSeekV31Parser(_DeepSeekParser):
    """DeepSeek V3.1: ``NAME<|tool_sep|>{arguments}``."""

    __slots__ = ()

    HEAD = re.compile(r"\s*([^<\s][^<]*?)\s*" + _DS_SEP + r"\s*(?=\{)")


class KimiK2Parser(_TokenSectionParser):
    """Kimi K2: ``functions.NAME:IDX<|tool_call_argument_begin|>{arguments}``; the model's call
    id is kept."""

    __slots__ = ()

    OPEN = Markers("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
    SECTION_CALL = Markers("<|tool_call_begin|>")
    SECTION_END = Markers("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
    HEAD_STOP = Markers(
        "<|tool_call_begin|>",
        "<|tool_call_end|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_section_end|>",
    )
    CALL_END = Markers("<|tool_call_end|>")
    HEAD = re.compile(r"\s*([^<\s][^<]*?)\s*<\|tool_call_argument_begin\|>\s*(?=\{)")

    def _name_and_id(self, m: re.Match[str]) -> tuple[str, str | None]:
        call_id = m.group(1).strip()
        base, sep, index = call_id.rpartition(":")
        name = base if sep and index.isdigit() else call_id
        return name.removeprefix("functions."), call_id


class Qwen3CoderParser(XmlArgsMachine):
    """``<tool_call><function=NAME><parameter=KEY>value</parameter>...</function></tool_call>``.

    A value may contain the tags themselves (code that writes this format, XML): as in vLLM's
    and SGLang's parsers, an end tag ends a value only where the structure goes on after it,
    past whitespace: ``</parameter>`` before ``<parameter=``, ``</function>``, ``</tool_call>``
    or the end of the output; ``</function>`` (a value whose ``</parameter>`` is missing) before
    ``</tool_call>`` or the end; ``</tool_call>`` before ``<tool_call>`` or the end. Otherwise
    the tag is text of the value. A ``<parameter=`` at the start of a line also ends a value
    that lacks its ``</parameter>``. The look past a tag is bounded (`MAX_GAP` whitespace
    characters), so the decision is the same whole or in pieces.
    """

    __slots__ = ()

    OPEN = Markers("<tool_call>")
    CALL_END = Markers("</tool_call>")
    PARAM_OPEN = "<parameter="
    KEY_END = ">"
    VALUE_END = Markers("</parameter>", "\n<parameter=", "</function>", "</tool_call>")
    VALUE_END_CONSUMED = frozenset({"</parameter>"})
    BETWEEN = Markers("<parameter=", "</function>", "</tool_call>")
    BODY_END_CONSUMED = frozenset({"</function>"})
    VALUE_WS = "newline"
    #: Whitespace looked past after an end tag; more than this, and the tag is value text.
    MAX_GAP = 64
    #: What must follow each end tag for it to end the value (None: it always does).
    _FOLLOWS: ClassVar[dict[str, Markers | None]] = {
        "</parameter>": Markers("<parameter=", "</function>", "</tool_call>"),
        "\n<parameter=": None,
        "</function>": Markers("</tool_call>"),
        "</tool_call>": Markers("<tool_call>"),
    }
    _HEAD = re.compile(r"\s*<function=([^>\n<]+)>")
    _STOP = Markers("</tool_call>", "<tool_call>", "<parameter=")

    def _ends_value(self, buf: str, m: re.Match[str], final: bool) -> bool | None:
        follows = self._FOLLOWS[m.group()]
        if follows is None:
            return True
        after = m.end()
        limit = min(len(buf), after + self.MAX_GAP)
        text = _NON_SPACE.search(buf, after, limit)
        if text is None:
            if limit - after >= self.MAX_GAP:
                return False  # a long run of whitespace: not where the structure goes on
            return True if final else None  # only whitespace up to the end so far
        marker = follows.at(buf, text.start())
        if marker == "":
            return True if final else None
        return marker is not None

    def _head(self, window: str) -> Head:
        kind, m = regex_head(window, self._HEAD, self._STOP)
        if m is None:
            p = skip_ws(window, 0)
            rest = window[p:]
            opener = "<function="
            if kind == NEED and not (opener.startswith(rest) or rest.startswith(opener)):
                return _FAIL  # not a function header, whatever follows
            return (kind, "", None, 0)
        name = m.group(1).strip()
        return (OK, name, None, m.end()) if name else _FAIL


class Glm45Parser(XmlArgsMachine):
    """``<tool_call>NAME<arg_key>KEY</arg_key><arg_value>value</arg_value>...</tool_call>``
    (with or without newlines)."""

    __slots__ = ()

    OPEN = Markers("<tool_call>")
    CALL_END = Markers("</tool_call>")
    PARAM_OPEN = "<arg_key>"
    KEY_END = "</arg_key>"
    VALUE_OPEN = Markers("<arg_value>")
    VALUE_END = Markers("</arg_value>")
    VALUE_END_CONSUMED = frozenset({"</arg_value>"})
    BETWEEN = Markers("<arg_key>", "</tool_call>")
    BODY_END_CONSUMED = frozenset()
    UNTYPED_JSON = True
    _NAME = re.compile(r"\s*([^\s<>]+)\s*")
    _AFTER_NAME = Markers("<arg_key>", "</tool_call>")

    def _head(self, window: str) -> Head:
        m = self._NAME.match(window)
        if m is None:
            return _NEED if not window.strip() else _FAIL
        if m.end() == len(window):
            return _NEED
        after = self._AFTER_NAME.at(window, m.end())
        if after == "":
            return _NEED
        if after is None:
            return _FAIL
        return (OK, m.group(1), None, m.end())


#: An attribute's value: double-quoted, single-quoted or bare (groups 1-3; see `_unquote`).
_ATTR_VALUE = r"""(?:"([^"\n<>]*)"|'([^'\n<>]*)'|([^\s"'<>]+))"""
_INVOKE_NAME = re.compile(r"\s*" + _ATTR_VALUE + r"\s*>")
#: What cannot stand inside an ``<invoke name=...>`` header before its ``>``.
_TAG_STOP = Markers("<", ">")


def _unquote(m: re.Match[str]) -> str:
    """The attribute value an `_ATTR_VALUE` match holds, without its quotes."""
    return next((g for g in m.groups()[:3] if g is not None), "")


class _InvokeParser(XmlArgsMachine, _TokenSectionParser):
    """A section of ``<invoke name="NAME">`` calls whose parameters are
    ``<parameter name="KEY">value</parameter>`` (MiniMax-M2; DeepSeek V3.2 with DSML tags)."""

    __slots__ = ()

    HEAD_STOP = _TAG_STOP
    HEAD = _INVOKE_NAME
    KEY_END = ">"
    #: The parameter's name after PARAM_OPEN (and, in DSML, its ``string`` attribute).
    KEY: ClassVar[re.Pattern[str]] = re.compile(r"\s*" + _ATTR_VALUE + r"\s*")

    def _name_and_id(self, m: re.Match[str]) -> tuple[str, str | None]:
        return _unquote(m).strip(), None

    def _read_key(self, raw: str) -> str | None:
        m = self.KEY.fullmatch(raw)
        return _unquote(m) if m else None


_DSML = "<\uff5cDSML\uff5c"  # `<|DSML|`, the bars U+FF5C FULLWIDTH VERTICAL LINE
_DSML_CALLS_END = "</\uff5cDSML\uff5cfunction_calls>"
_DSML_INVOKE_END = "</\uff5cDSML\uff5cinvoke>"


class DeepSeekV32Parser(_InvokeParser):
    """DeepSeek V3.2's DSML: ``<|DSML|function_calls>``, then per call ``<|DSML|invoke
    name="NAME">`` and ``<|DSML|parameter name="KEY" string="true|false">value
    </|DSML|parameter>``, ``</|DSML|invoke>``; ``</|DSML|function_calls>`` closes (each bar
    is U+FF5C, as in DeepSeek's other markers).

    As DeepSeek's own encoder writes it: ``string="true"``: the value is the text as written
    (streamed as a JSON string); ``string="false"``: it is JSON (a number, a boolean, an array,
    an object), typed by the tool's schema where it declares the parameter, and kept as text
    when it is not JSON after all. Without the attribute, the schema types the value.
    """

    __slots__ = ("_string",)

    OPEN = Markers(_DSML + "function_calls>")
    SECTION_CALL = Markers(_DSML + "invoke name=")
    SECTION_END = Markers(_DSML_CALLS_END)
    PARAM_OPEN = _DSML + "parameter name="
    VALUE_END = Markers("</\uff5cDSML\uff5cparameter>", _DSML_INVOKE_END, _DSML_CALLS_END)
    VALUE_END_CONSUMED = frozenset({"</\uff5cDSML\uff5cparameter>"})
    BETWEEN = Markers(PARAM_OPEN, _DSML_INVOKE_END, _DSML_CALLS_END)
    BODY_END_CONSUMED = frozenset({_DSML_INVOKE_END})
    UNTYPED_JSON = True
    KEY = re.compile(r"\s*" + _ATTR_VALUE + r'(?:\s+string\s*=\s*"(true|false)")?\s*')

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._string: bool | None = None

    def _read_key(self, raw: str) -> str | None:
        m = self.KEY.fullmatch(raw)
        if m is None:
            return None
        self._string = None if m.group(4) is None else m.group(4) == "true"
        return _unquote(m)

    def _streams(self, spec: object) -> bool:
        return super()._streams(spec) if self._string is None else self._string


_MINIMAX_END = "</minimax:tool_call>"


class MiniMaxM2Parser(_InvokeParser):
    """MiniMax-M2: ``<minimax:tool_call>``, then per call ``<invoke name="NAME">`` and
    ``<parameter name="KEY">value</parameter>``, ``</invoke>``; ``</minimax:tool_call>``
    closes. Whitespace around a value is not part of it; values are typed by the tool's schema
    (a parameter it does not declare is text), as MiniMax's reference parser does."""

    __slots__ = ()

    OPEN = Markers("<minimax:tool_call>")
    SECTION_CALL = Markers("<invoke name=")
    SECTION_END = Markers(_MINIMAX_END)
    PARAM_OPEN = "<parameter name="
    VALUE_END = Markers("</parameter>", "</invoke>", _MINIMAX_END)
    VALUE_END_CONSUMED = frozenset({"</parameter>"})
    BETWEEN = Markers(PARAM_OPEN, "</invoke>", _MINIMAX_END)
    BODY_END_CONSUMED = frozenset({"</invoke>"})
    VALUE_WS = "strip"
