"""Chat messages checked against OpenAI's published schema, with OpenAI's error messages.

A message's shape depends on its role (`ChatCompletionRequestMessage` is a union tagged by
`role`): `system` and `developer` need text content; `user` needs content, a string or parts of
type `text`, `image_url`, `input_audio` or `file`; `assistant` may have no content when it calls
tools, and its parts are `text` or `refusal`; `tool` needs content and `tool_call_id`;
`function` (deprecated) needs `name`. A struct type per role would drop the fields a chat
template reads that the schema does not list, so messages stay the maps the client sent and
this module checks them: one pass, a few dict lookups per message.

Errors read as OpenAI's do (``Invalid value: 'wizard'. Supported values are: ...``,
``Missing required parameter: 'messages[0].content'.``, ``Invalid type for
'messages[0].content': expected one of a string or array of objects, but got an integer
instead.``), with `param` naming the path and `code` one of `invalid_value`,
`missing_required_parameter`, `invalid_type`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynamo_core.frontend.openai import ParamError

__all__ = ["check_messages", "invalid_type", "invalid_value", "missing", "tagged"]

ROLES = ("system", "assistant", "user", "function", "tool", "developer")
_USER_PARTS = ("text", "image_url", "input_audio", "file")
_ASSISTANT_PARTS = ("text", "refusal")
_TEXT_PARTS = ("text",)
#: The field each content-part type carries, and that field's JSON type.
_PART_FIELD = {
    "text": ("text", str),
    "image_url": ("image_url", dict),
    "input_audio": ("input_audio", dict),
    "file": ("file", dict),
    "refusal": ("refusal", str),
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _supported(values: Sequence[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def invalid_value(value: Any, supported: Sequence[str], param: str) -> ParamError:
    return ParamError(
        f"Invalid value: '{value}'. Supported values are: {_supported(supported)}.",
        param,
        "invalid_value",
    )


def missing(param: str) -> ParamError:
    return ParamError(
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    )


def invalid_type(param: str, expected: str, value: Any) -> ParamError:
    return ParamError(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
        param,
        "invalid_type",
    )


def check_messages(messages: list[Any], root: str = "messages") -> None:
    """Raise `ParamError` for the first message that breaks the schema."""
    if not messages:
        raise ParamError(f"{root} must not be empty", root, "empty_array")
    for i, message in enumerate(messages):
        at = f"{root}[{i}]"
        _check_message(message, tagged(message, "role", ROLES, at), at)


def tagged(item: Any, key: str, allowed: Sequence[str], at: str) -> str:
    """`item[key]`, where `item` (at `at`) must be an object whose `key` is one of `allowed`."""
    if not isinstance(item, dict):
        raise invalid_type(at, "an object", item)
    value = item.get(key)
    if value is None:
        raise missing(f"{at}.{key}")
    if value not in allowed:
        raise invalid_value(value, allowed, f"{at}.{key}")
    return str(value)


def _check_message(message: dict[str, Any], role: str, at: str) -> None:
    content = message.get("content")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid_type(f"{at}.name", "a string", name)
    if role == "assistant":
        if content is not None:
            _check_content(content, f"{at}.content", _ASSISTANT_PARTS)
        _check_tool_calls(message.get("tool_calls"), f"{at}.tool_calls")
        refusal = message.get("refusal")
        if refusal is not None and not isinstance(refusal, str):
            raise invalid_type(f"{at}.refusal", "a string", refusal)
        return
    if role == "function":
        if not isinstance(name, str):
            raise (
                missing(f"{at}.name")
                if name is None
                else invalid_type(f"{at}.name", "a string", name)
            )
        if content is not None and not isinstance(content, str):
            raise invalid_type(f"{at}.content", "a string", content)
        return
    if "content" not in message or content is None:
        raise missing(f"{at}.content")
    parts = _USER_PARTS if role == "user" else _TEXT_PARTS
    _check_content(content, f"{at}.content", parts)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id is None:
            raise missing(f"{at}.tool_call_id")
        if not isinstance(call_id, str):
            raise invalid_type(f"{at}.tool_call_id", "a string", call_id)


def _check_content(content: Any, at: str, allowed: Sequence[str]) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid_type(at, "one of a string or array of objects", content)
    for j, part in enumerate(content):
        where = f"{at}[{j}]"
        kind = tagged(part, "type", allowed, where)
        key, expected = _PART_FIELD[kind]
        value = part.get(key)
        if value is None:
            raise missing(f"{where}.{key}")
        if not isinstance(value, expected):
            raise invalid_type(
                f"{where}.{key}", "a string" if expected is str else "an object", value
            )


def _check_tool_calls(calls: Any, at: str) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise invalid_type(at, "an array", calls)
    for k, call in enumerate(calls):
        where = f"{at}[{k}]"
        if not isinstance(call, dict):
            raise invalid_type(where, "an object", call)
        for key in ("id", "type", "function"):
            if call.get(key) is None:
                raise missing(f"{where}.{key}")
        if call["type"] != "function":
            raise invalid_value(call["type"], ("function",), f"{where}.type")
        function = call["function"]
        if not isinstance(function, dict):
            raise invalid_type(f"{where}.function", "an object", function)
        for key in ("name", "arguments"):
            value = function.get(key)
            if value is None:
                raise missing(f"{where}.function.{key}")
            if not isinstance(value, str):
                raise invalid_type(f"{where}.function.{key}", "a string", value)
