"""What a request asks of its output: a structured-output constraint, tool calls, reasoning.

`plan_output(...)` decides, once per request, from the model's parsers (its card's
`--dyn-tool-call-parser` / `--dyn-reasoning-parser`, or the frontend's overrides) and the
request's `tools`, `tool_choice`, `response_format` and vLLM-style `guided_*` fields:

- **the constraint** (`GuidedDecoding`) the engine must honour: the request's own
  (`response_format` json_object / json_schema, `guided_json`/`guided_regex`/`guided_choice`/
  `guided_grammar`), or, for ``tool_choice: "required"`` or a named function, one built from the
  tools, as vLLM builds it: a named function's `parameters` schema, or for ``required`` an array
  of ``{"name": ..., "parameters": ...}`` objects (one of the tools each; at most one with
  ``parallel_tool_calls: false``);
- **the parser** of each choice's text: the model's family parser (``tool_choice`` ``auto``;
  ``none`` or no tools leaves calls in the content), or one of the two JSON parsers here for a
  forced choice; none when nothing needs parsing (the streaming fast path stays as it was);
- **how to detokenize**: with a family parser the markup is often made of special tokens, so
  they are kept (``skip_special_tokens=False``; the end-of-sequence token is still not shown).

A constrained output is never given to a family parser: an engine applies the constraint from
the first token, so there is no reasoning or markup to find, and a JSON answer must not be taken
for a call (llama3_json would). Schemas are checked here (`check_schema`), so a malformed one is
a 400 naming the request field rather than an engine's error after routing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dynamo_core.frontend.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ParamError,
    ResponseFormat,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
)
from dynamo_core.llm.parsers import (
    Content,
    Event,
    ParsedOutput,
    ParserSpec,
    ToolCallArguments,
    ToolCallStart,
    collect,
    new_call_id,
)
from dynamo_core.llm.parsers._base import JsonSpan, loads_strict, skip_ws
from dynamo_core.llm.parsers.registry import TOOL_CALL_PARSERS
from dynamo_core.llm.protocol import GuidedDecoding

__all__ = [
    "NO_PLAN",
    "NamedCallParser",
    "OutputPlan",
    "RequiredCallsParser",
    "TextParser",
    "check_schema",
    "guided_from_fields",
    "guided_from_response_format",
    "plan_chat",
    "plan_completion",
    "plan_output",
    "required_calls_schema",
]


class TextParser(Protocol):
    """What a choice's output goes through: a family's `OutputParser` or a forced-call one."""

    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...

    def parse(self, text: str) -> ParsedOutput: ...


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How one request's output is constrained and parsed (see the module docstring)."""

    guided: GuidedDecoding | None = None
    new_parser: Callable[[], TextParser] | None = None
    """A fresh parser per choice; None: the text is the content, as it comes."""
    skip_special_tokens: bool = True
    structured: str | None = None
    """The kind of constraint, for the metrics: a `GuidedKind`, or ``tool_choice``."""


NO_PLAN = OutputPlan()

ToolChoiceValue = str | None
"""``none``, ``auto``, ``required``, a function's name (a named choice), or None (unset)."""


def plan_chat(body: ChatCompletionRequest, spec: ParserSpec) -> OutputPlan:
    """The plan of a chat completion (raises `ParamError` on a rule the request breaks)."""
    if (
        spec.tool_call_parser is None
        and spec.reasoning_parser is None
        and body.tool_choice is None
        and body.response_format is None
        and not _guided_fields_given(body)
    ):
        return NO_PLAN  # the common case, decided in a few attribute reads
    choice = body.tool_choice
    named = choice.function.name if choice is not None and not isinstance(choice, str) else None
    guided = _one_constraint(
        guided_from_response_format(body.response_format, "response_format"),
        guided_from_fields(body),
    )
    return plan_output(
        spec,
        body.tool_dicts(),
        named if named is not None else choice if isinstance(choice, str) else None,
        named=named is not None,
        parallel=body.parallel_tool_calls is not False,
        guided=guided,
    )


def plan_completion(body: CompletionRequest) -> OutputPlan:
    """Completions have no tools and no parsers: only a constraint, if asked."""
    guided = guided_from_fields(body)
    return OutputPlan(guided=guided, structured=guided.kind if guided else None)


def plan_output(
    spec: ParserSpec,
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: ToolChoiceValue,
    *,
    named: bool = False,
    parallel: bool = True,
    guided: GuidedDecoding | None = None,
) -> OutputPlan:
    """The plan for `tools` (Chat Completions or Responses shape) and `tool_choice`."""
    functions = _functions(tools)
    if tool_choice is not None and not tools:
        raise ParamError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            "tool_choice",
            "invalid_value",
        )
    forced = named or tool_choice == "required"
    if forced and guided is not None:
        raise ParamError(
            "a structured-output constraint (response_format or guided_*) cannot be combined "
            "with a forced tool_choice ('required' or a named function)",
            "tool_choice",
            "invalid_value",
        )
    if named:
        assert tool_choice is not None
        if tool_choice not in functions:
            raise ParamError(
                f"Invalid value for 'tool_choice': function '{tool_choice}' is not one of "
                f"'tools' ({', '.join(functions)}).",
                "tool_choice",
                "invalid_value",
            )
        schema = functions[tool_choice] or {"type": "object"}
        name = tool_choice
        return OutputPlan(
            guided=GuidedDecoding(json=schema),
            new_parser=lambda: NamedCallParser(name, _call_ids(spec)),
            structured="tool_choice",
        )
    if forced:
        return OutputPlan(
            guided=GuidedDecoding(json=required_calls_schema(functions, parallel)),
            new_parser=lambda: RequiredCallsParser(_call_ids(spec)),
            structured="tool_choice",
        )
    if guided is not None:
        return OutputPlan(guided=guided, structured=guided.kind)
    calls = bool(tools) and tool_choice != "none"
    harmony = spec.tool_call_parser is not None and TOOL_CALL_PARSERS[spec.tool_call_parser].harmony
    if not (spec.reasoning_parser or (spec.tool_call_parser and (calls or harmony))):
        return NO_PLAN
    tool_list = list(tools) if tools else None
    return OutputPlan(
        new_parser=lambda: spec.new_parser(tools=tool_list, tool_calls=calls),
        skip_special_tokens=False,
    )


def _call_ids(spec: ParserSpec) -> Callable[[], str]:
    """Call ids as the model's family makes them (Mistral's templates want 9 alphanumerics)."""
    if spec.tool_call_parser is None:
        return new_call_id
    factory = TOOL_CALL_PARSERS[spec.tool_call_parser].factory
    ids: Callable[[], str] = getattr(factory, "default_call_id", new_call_id)
    return ids


def _functions(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any] | None]:
    """name -> parameters schema, for either tool shape."""
    out: dict[str, dict[str, Any] | None] = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        out[fn["name"]] = fn.get("parameters")
    return out


def required_calls_schema(
    functions: Mapping[str, dict[str, Any] | None], parallel: bool
) -> dict[str, Any]:
    """vLLM's schema for ``tool_choice: "required"``: an array of calls of the tools."""
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        "parameters": params or {"type": "object"},
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, params in functions.items()
            ]
        },
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


# -- constraints from the request -------------------------------------------------------------


def guided_from_response_format(fmt: ResponseFormat | None, param: str) -> GuidedDecoding | None:
    """The constraint of OpenAI's `response_format` (None for ``text`` or unset)."""
    if isinstance(fmt, ResponseFormatJsonObject):
        return GuidedDecoding(json_object=True)
    if isinstance(fmt, ResponseFormatJsonSchema):
        schema = fmt.json_schema.schema_
        if schema is None:
            return GuidedDecoding(json_object=True)
        check_schema(schema, f"{param}.json_schema.schema")
        return GuidedDecoding(json=schema)
    return None


_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _guided_fields_given(body: ChatCompletionRequest | CompletionRequest) -> bool:
    if not (
        body.guided_json is None
        and body.guided_regex is None
        and body.guided_choice is None
        and body.guided_grammar is None
    ):
        return True
    nvext = body.nvext
    return nvext is not None and any(getattr(nvext, f) is not None for f in _GUIDED_FIELDS)


def guided_from_fields(body: ChatCompletionRequest | CompletionRequest) -> GuidedDecoding | None:
    """The constraint of vLLM's `guided_json` / `guided_regex` / `guided_choice` /
    `guided_grammar` (top level or under `nvext`)."""
    if not _guided_fields_given(body):
        return None
    values = {name: body.extension(name) for name in _GUIDED_FIELDS}
    given = [name for name, value in values.items() if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ParamError(f"set one of {', '.join(given)}, not several", given[1], "invalid_value")
    param = given[0]
    try:
        guided = GuidedDecoding.from_guided_fields(**values)
    except ValueError as exc:
        raise ParamError(str(exc), param, "invalid_value") from None
    assert guided is not None
    if guided.json is not None:
        check_schema(guided.json, param)
    if guided.regex is not None:
        try:
            re.compile(guided.regex)
        except re.error as exc:
            raise ParamError(f"guided_regex is not a valid regex: {exc}", param) from None
    return guided


def _one_constraint(*found: GuidedDecoding | None) -> GuidedDecoding | None:
    given = [g for g in found if g is not None]
    if len(given) > 1:
        raise ParamError(
            "response_format and guided_* both constrain the output: set one",
            "response_format",
            "invalid_value",
        )
    return given[0] if given else None


# -- schema check ------------------------------------------------------------------------------

_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = (
    "additionalProperties",
    "unevaluatedProperties",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
_COUNTS = (
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
)
_NUMBERS = ("minimum", "maximum", "multipleOf")
_MAX_DEPTH = 64


def check_schema(schema: Any, param: str) -> None:
    """Raise `ParamError` where `schema` is not a JSON Schema (a keyword of the wrong type, an
    unknown `type`, a `pattern` that is no regex, nesting deeper than 64)."""
    stack: list[tuple[Any, str, int]] = [(schema, "", 0)]
    while stack:
        node, at, depth = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            _bad_schema(param, at, "a schema must be an object or a boolean")
        if depth > _MAX_DEPTH:
            _bad_schema(param, at, f"nested deeper than {_MAX_DEPTH}")
        _check_keywords(node, param, at)
        for key in _SCHEMA_MAPS:
            value = node.get(key)
            if value is not None:
                if not isinstance(value, dict):
                    _bad_schema(param, _join(at, key), "must be an object of schemas")
                stack.extend((v, _join(at, f"{key}.{k}"), depth + 1) for k, v in value.items())
        for key in _SCHEMA_LISTS:
            value = node.get(key)
            if value is not None:
                if not isinstance(value, list) or not value:
                    _bad_schema(param, _join(at, key), "must be a non-empty array of schemas")
                stack.extend((v, _join(at, f"{key}[{i}]"), depth + 1) for i, v in enumerate(value))
        for key in _SCHEMAS:
            if key in node:
                stack.append((node[key], _join(at, key), depth + 1))
        items = node.get("items")
        if isinstance(items, list):
            stack.extend((v, _join(at, f"items[{i}]"), depth + 1) for i, v in enumerate(items))
        elif items is not None:
            stack.append((items, _join(at, "items"), depth + 1))


def _check_keywords(node: dict[str, Any], param: str, at: str) -> None:
    kind = node.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        for k in kinds:
            if not isinstance(k, str) or k not in _TYPES:
                _bad_schema(param, _join(at, "type"), f"{json.dumps(k)} is not a JSON Schema type")
    required = node.get("required")
    if required is not None and (
        not isinstance(required, list) or not all(isinstance(r, str) for r in required)
    ):
        _bad_schema(param, _join(at, "required"), "must be an array of property names")
    enum = node.get("enum")
    if enum is not None and not isinstance(enum, list):
        _bad_schema(param, _join(at, "enum"), "must be an array")
    for key in _COUNTS:
        value = node.get(key)
        if value is not None and (type(value) is not int or value < 0):
            _bad_schema(param, _join(at, key), "must be a non-negative integer")
    for key in _NUMBERS:
        value = node.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            _bad_schema(param, _join(at, key), "must be a number")
    pattern = node.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            _bad_schema(param, _join(at, "pattern"), "must be a string")
        try:
            re.compile(pattern)
        except re.error as exc:
            _bad_schema(param, _join(at, "pattern"), f"is not a valid regex ({exc})")
    ref = node.get("$ref")
    if ref is not None and not isinstance(ref, str):
        _bad_schema(param, _join(at, "$ref"), "must be a string")


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _bad_schema(param: str, at: str, why: str) -> None:
    where = f" at '{at}'" if at else ""
    raise ParamError(f"Invalid JSON schema in '{param}'{where}: {why}.", param, "invalid_schema")


# -- parsers of a forced tool choice -----------------------------------------------------------


class NamedCallParser:
    """``tool_choice`` naming a function: the whole output is that call's arguments (the
    engine generates them under the function's `parameters` schema), streamed as they come."""

    __slots__ = ("_id", "_name", "_started")

    def __init__(self, name: str, call_id: Callable[[], str] = new_call_id) -> None:
        self._name = name
        self._id = call_id
        self._started = False

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._started:
            return [ToolCallArguments(0, text)]
        self._started = True
        return [ToolCallStart(0, self._id(), self._name), ToolCallArguments(0, text)]

    def finish(self) -> list[Event]:
        return []

    def parse(self, text: str) -> ParsedOutput:
        return collect([*self.feed(text), *self.finish()])


class RequiredCallsParser:
    """``tool_choice: "required"``: the output is a JSON array of ``{"name", "parameters"}``
    objects (`required_calls_schema`); each call is sent once its object is complete.

    Text that is not such an array (an engine that did not honour the constraint, or a
    `max_tokens` cut) ends up in the content, as with every parser."""

    __slots__ = ("_buf", "_call_id", "_done", "_index", "_opened", "_pos", "_span", "_start")

    def __init__(self, call_id: Callable[[], str] = new_call_id) -> None:
        self._call_id = call_id
        self._buf = ""
        self._pos = 0
        self._opened = False
        self._done = False
        self._start = -1
        self._span = JsonSpan()
        self._index = -1

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while not self._done and self._advance(out):
            pass
        return out

    def _advance(self, out: list[Event]) -> bool:
        buf = self._buf
        if self._start >= 0:
            end = self._span.scan(buf, self._pos)
            if end < 0:
                self._pos = len(buf)
                return False
            self._emit(buf[self._start : end], out)
            self._start = -1
            self._buf = buf[end:]  # what is sent is dropped: a feed costs its own length
            self._pos = 0
            return True
        pos = skip_ws(buf, self._pos)
        if pos >= len(buf):
            return False
        c = buf[pos]
        if not self._opened:
            if c != "[":
                self._done = True  # not a call array: content, at finish
                return False
            self._opened = True
        elif c == "{":
            self._start = pos
            self._span = JsonSpan()
            self._pos = pos
            return True
        elif c == "]":
            self._done = True
        elif c != ",":
            self._done = True
            return False
        self._pos = pos + 1
        return True

    def _emit(self, element: str, out: list[Event]) -> None:
        try:
            call = loads_strict(element)
            name = call["name"]
            arguments = call["parameters"]
        except (ValueError, KeyError, TypeError):
            out.append(Content(element))
            return
        self._index += 1
        out.append(ToolCallStart(self._index, self._call_id(), str(name)))
        out.append(ToolCallArguments(self._index, json.dumps(arguments, ensure_ascii=False)))

    def finish(self) -> list[Event]:
        if self._index < 0:
            rest = self._buf  # no call at all: all of it is content
        else:
            rest = self._buf[self._start if self._start >= 0 else self._pos :]
        self._buf = ""
        self._pos = 0
        self._start = -1
        self._done = True
        return [Content(rest)] if rest.strip() else []

    def parse(self, text: str) -> ParsedOutput:
        return collect([*self.feed(text), *self.finish()])
