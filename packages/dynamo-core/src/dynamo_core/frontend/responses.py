"""The Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`).

A Responses request is a chat completion in another shape, so it takes the same path: its
`input` (a string, or message / `function_call` / `function_call_output` items) and
`instructions` become chat messages for the model's template, its function `tools`,
`tool_choice` and `text.format` go through `dynamo_core.frontend.structured` (the same parsers
and constraints as chat), and `ResponsesFormatter` writes the output as Responses objects:

- whole: a `response` object whose `output` holds a `reasoning` item (the reasoning parser's
  text, as `reasoning_text` content), a `message` item (`output_text`) and one `function_call`
  item per call; `status` is `incomplete` (`max_output_tokens`) when the output was cut;
- streamed: the typed events the OpenAI SDK's `responses.stream` accumulates, in its order:
  `response.created`, `response.in_progress`, then per item `response.output_item.added`,
  (`response.content_part.added`, `response.output_text.delta`... / `response.reasoning_text.
  delta`..., their `.done`, `response.content_part.done`) or (`response.function_call_arguments.
  delta`..., `.done`), `response.output_item.done`; last `response.completed` (or
  `response.incomplete`) with the whole response and its usage. Every event has its
  `sequence_number`; each is an SSE `event:` + `data:` pair, and no `[DONE]` follows (OpenAI sends
  none on this route). A failure mid-stream is an `error` event then `response.failed`.

`previous_response_id` continues a conversation: each stored response keeps the whole
conversation that led to it (its input messages, earlier turns included, and its output as an
assistant message; not its `instructions`, which OpenAI does not carry over), so a chain does not
break when an older response is evicted. An unknown, evicted or deleted id is a 404
(`previous_response_not_found`; `response_not_found` on `GET`/`DELETE`); so is the id of a
response still being generated, or one made with ``store: false``.

Where `ResponseStore` keeps them:

- one frontend process, no `--responses-store-dir`: in its memory;
- `--responses-store-dir PATH`: one file per response there (`resp_<32 hex>.json`: its id, its
  JSON, its conversation), so they survive a restart of the frontend and every process using
  the folder sees every one: a follow-up, `GET` or `DELETE` may land on any of them, and a
  response deleted or evicted by one is gone for all. Files are written whole (a temporary file,
  then a rename) and removed by `DELETE` or eviction; a file that does not read back as a stored
  response (cut, garbage) is a 404, logged once, never a 500; an id not of the shape this store
  makes is a 404 without touching the disk (no path can be smuggled in);
- `--http-workers N` (N > 1) without a folder: worker 0 makes a private temporary folder, hands
  it to its copies (`--responses-store-dir` on their command line) and removes it when it stops
  (not if it is killed outright: the folder is left in the system's temporary directory).

File IO runs in a thread, never on the event loop. A response is written before the client can
see it finished (the last event of a stream, the body of a whole response), so a follow-up that
reaches another process right after finds it.

Bounds: each process keeps at most `--responses-max-stored` responses and
`--responses-max-stored-bytes` bytes (a response's JSON plus its conversation's) of those *it*
wrote, the least recently used (by that process) out first; with N processes the folder holds up
to N times that. A response another process deleted still counts for its writer until evicted
there. A process does not count files it did not write: at start, the process the user started
trims the folder to N times the bounds (the newest files kept) and removes temporary files a
killed writer left; what it keeps leaves by `DELETE`, or at a later start's trim (so do the
files of a copy that died and was started again).

Not supported (a 400 that says so): hosted tools (web search, file search, computer use, code
interpreter, MCP...), `input_file` and `input_image` by file id, `item_reference` items,
background mode.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, Literal

import msgspec

from dynamo_core.errors import ConfigError
from dynamo_core.frontend.messages import invalid_type, invalid_value, missing, tagged
from dynamo_core.frontend.openai import (
    ChoiceResult,
    NvExt,
    ParamError,
    Penalty,
    PositiveInt,
    Seed,
    Temperature,
    TopP,
)
from dynamo_core.frontend.structured import (
    OutputPlan,
    check_schema,
    plan_output,
)
from dynamo_core.llm.parsers import Content, Event, ParserSpec, Reasoning, ToolCallStart
from dynamo_core.llm.protocol import GuidedDecoding

__all__ = [
    "ResponseStore",
    "ResponsesCall",
    "ResponsesFormatter",
    "ResponsesRequest",
    "prepare_responses",
]

log = logging.getLogger("dynamo.frontend.responses")

_json = msgspec.json.Encoder()


# -- the request ---------------------------------------------------------------------------------


class ResponsesTool(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoice(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None


class FormatText(msgspec.Struct, tag_field="type", tag="text"):
    pass


class FormatJsonObject(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class FormatJsonSchema(
    msgspec.Struct, tag_field="type", tag="json_schema", kw_only=True, rename={"schema_": "schema"}
):
    name: str
    schema_: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    format: FormatText | FormatJsonObject | FormatJsonSchema | None = None
    verbosity: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """`POST /v1/responses`, as OpenAI's schema types it (plus the engine extensions that chat
    accepts: `seed`, `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, also
    under `nvext`)."""

    model: str
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    reasoning: dict[str, Any] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    seed: Seed | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    nvext: NvExt | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    def logprobs_count(self) -> int | None:
        return None

    def prompt_logprobs_count(self) -> int | None:
        return None

    def stop_strings(self) -> list[str]:
        return []

    def include_usage(self) -> bool:
        return True

    def choices(self) -> int:
        return 1

    def extension(self, name: str) -> Any:
        return getattr(self.nvext, name, None) if self.nvext is not None else None


@dataclass(frozen=True, slots=True)
class ResponsesCall:
    """A Responses request made ready for the chat path."""

    messages: list[dict[str, Any]]
    """What the chat template renders: the instructions, earlier turns, this input."""
    conversation: list[dict[str, Any]]
    """The same without the instructions: what a follow-up continues."""
    template_tools: list[dict[str, Any]] | None
    plan: OutputPlan


def prepare_responses(
    body: ResponsesRequest, parsers: ParserSpec, earlier: list[dict[str, Any]] | None = None
) -> ResponsesCall:
    """Messages, tools and output plan of `body` (raises `ParamError`); `earlier`: the
    conversation of its `previous_response_id`, looked up by the caller
    (`ResponseStore.conversation`)."""
    if body.background:
        raise ParamError("background mode is not supported", "background", "unsupported_parameter")
    conversation: list[dict[str, Any]] = list(earlier or ())
    conversation.extend(_input_messages(body.input))
    if not conversation:
        raise ParamError("input must not be empty", "input", "empty_array")
    messages = list(conversation)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    tools = _chat_tools(body.tools)
    named = isinstance(body.tool_choice, ResponsesToolChoice)
    plan = plan_output(
        parsers,
        tools,
        _tool_choice(body.tool_choice),
        named=named,
        parallel=body.parallel_tool_calls is not False,
        guided=_guided(body.text),
    )
    return ResponsesCall(messages, conversation, tools, plan)


def _chat_tools(tools: list[ResponsesTool] | None) -> list[dict[str, Any]] | None:
    """Function tools in the Chat Completions shape chat templates read."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise ParamError(
                f"tools[{i}]: hosted tools ('{tool.type}') are not supported; only 'function' "
                "tools are",
                f"tools[{i}].type",
                "unsupported_parameter",
            )
        if tool.name is None:
            raise missing(f"tools[{i}].name")
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | ResponsesToolChoice | None) -> str | None:
    if not isinstance(choice, ResponsesToolChoice):
        return choice
    if choice.type != "function":
        raise ParamError(
            f"tool_choice: hosted tools ('{choice.type}') are not supported",
            "tool_choice.type",
            "unsupported_parameter",
        )
    if choice.name is None:
        raise missing("tool_choice.name")
    return choice.name


def _guided(text: TextConfig | None) -> GuidedDecoding | None:
    fmt = text.format if text is not None else None
    if isinstance(fmt, FormatJsonObject):
        return GuidedDecoding(json_object=True)
    if isinstance(fmt, FormatJsonSchema):
        check_schema(fmt.schema_, "text.format.schema")
        return GuidedDecoding(json=fmt.schema_)
    return None


_ROLES = ("user", "assistant", "system", "developer")
_ITEMS = ("message", "function_call", "function_call_output", "reasoning")
_PARTS = ("input_text", "output_text", "input_image", "refusal")


def _input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """Chat messages of a Responses `input` (`ParamError` naming the item on a bad one)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid_type(at, "an object", item)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, at))
        elif kind == "function_call":
            call = {
                "id": _text_field(item, "call_id", at),
                "type": "function",
                "function": {
                    "name": _text_field(item, "name", at),
                    "arguments": _text_field(item, "arguments", at),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):  # parts: their text
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            if not isinstance(output, str):
                output = _text_field(item, "output", at)  # the error that names it
            call_id = _text_field(item, "call_id", at)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again (chat templates drop it)
        else:
            raise invalid_value(kind, _ITEMS, f"{at}.type")
    return messages


def _message(item: dict[str, Any], at: str) -> dict[str, Any]:
    role = tagged(item, "role", _ROLES, at)
    content = item.get("content")
    if content is None:
        raise missing(f"{at}.content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise invalid_type(f"{at}.content", "one of a string or array of objects", content)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{at}.content[{j}]"
        if not isinstance(part, dict):
            raise invalid_type(where, "an object", part)
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": _text_field(part, "text", where)})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise ParamError(
                    f"{where}: only images given by image_url are supported",
                    f"{where}.image_url",
                    "unsupported_parameter",
                )
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "refusal":
            continue
        elif kind is None:
            raise missing(f"{where}.type")
        else:
            raise invalid_value(kind, _PARTS, f"{where}.type")
    return {"role": role, "content": parts}


def _text_field(item: dict[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if value is None:
        raise missing(f"{at}.{key}")
    if not isinstance(value, str):
        raise invalid_type(f"{at}.{key}", "a string", value)
    return value


# -- the store -----------------------------------------------------------------------------------


class ResponseStore:
    """Stored responses for `previous_response_id` and `GET`/`DELETE /v1/responses/{id}`: in
    memory, or one file each in `directory` (see the module docstring). At most
    `max_responses` of them and `max_bytes` in all (a response's JSON plus its conversation's)
    of those this object stored, least recently used out first."""

    def __init__(
        self,
        max_responses: int = 1024,
        max_bytes: int = 64 * 2**20,
        directory: Path | None = None,
    ) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.directory = directory
        self._sizes: OrderedDict[str, int] = OrderedDict()  # what this object stored, LRU first
        self._memory: dict[str, tuple[bytes, list[dict[str, Any]]]] = {}  # without a directory
        self._warned: set[str] = set()  # unreadable files already logged
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def open(self, processes: int = 1) -> None:
        """Make the directory, then trim what earlier runs left to `processes` times the
        bounds (the newest kept); temporary files older than a minute (a writer killed
        mid-write) go too. Blocking: at start, before anything is served. `ConfigError` if
        the directory cannot be made or written."""
        directory = self.directory
        assert directory is not None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "permission denied")
            found = _stored_files(directory)
        except OSError as exc:
            raise ConfigError(
                f"cannot keep responses in --responses-store-dir {directory}: {exc.strerror or exc}"
            ) from None
        found.sort(reverse=True)  # newest first
        kept = total = 0
        for _, size, path in found:
            total += size
            if kept < processes * self.max_responses and total <= processes * self.max_bytes:
                kept += 1
            else:
                path.unlink(missing_ok=True)
        log.info(
            "stored responses in %s: %d from earlier runs kept, %d older removed",
            directory,
            kept,
            len(found) - kept,
        )

    async def put(
        self, response_id: str, response: bytes, conversation: list[dict[str, Any]]
    ) -> None:
        """Store a response (`response_id`: one this module made); its file, if any, is written
        when this returns. One too large to keep, or that cannot be written, is logged and not
        kept."""
        if not _is_id(response_id):
            raise ValueError(f"not a response id: {response_id!r}")
        if self.max_responses == 0:
            return  # storing is off (--responses-max-stored 0): nothing to say per response
        encoded = _json.encode(conversation)
        size = len(response) + len(encoded)
        if size > self.max_bytes:
            log.warning(
                "response %s is not stored: %d bytes, more than --responses-max-stored-bytes",
                response_id,
                size,
            )
            return
        self._forget(response_id)
        self._sizes[response_id] = size
        self.bytes += size
        evicted = []
        while len(self._sizes) > self.max_responses or self.bytes > self.max_bytes:
            old, dropped = self._sizes.popitem(last=False)
            self.bytes -= dropped
            self.evicted += 1
            evicted.append(old)
        if self.directory is None:
            self._memory[response_id] = (response, conversation)
            for old in evicted:
                del self._memory[old]
            return
        record = _Stored(response_id, msgspec.Raw(response), msgspec.Raw(encoded))
        try:  # the bookkeeping is done: a cancelled await leaves the thread to finish it
            await asyncio.to_thread(
                _write, self.directory, response_id, _json.encode(record), evicted
            )
        except OSError as exc:
            self._forget(response_id)
            log.warning("response %s is not stored: %s", response_id, exc)

    async def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation that ends with `response_id`'s output (None: not stored)."""
        if self.directory is None:
            entry = self._memory_entry(response_id)
            return entry[1] if entry is not None else None
        found = await self._load(response_id, conversation=True)
        return found if isinstance(found, list) else None

    async def response(self, response_id: str) -> bytes | None:
        """`response_id`'s JSON (None: not stored)."""
        if self.directory is None:
            entry = self._memory_entry(response_id)
            return entry[0] if entry is not None else None
        found = await self._load(response_id, conversation=False)
        return found if isinstance(found, bytes) else None

    async def delete(self, response_id: str) -> bool:
        """Remove `response_id` (for every process using the directory); False: not stored."""
        if not _is_id(response_id):
            return False
        self._forget(response_id)
        if self.directory is None:
            return self._memory.pop(response_id, None) is not None
        try:
            existed = await asyncio.to_thread(_remove, self.directory, response_id)
        except _Unreadable as exc:
            self._warn(response_id, exc)
            return False
        return existed

    def _memory_entry(self, response_id: str) -> tuple[bytes, list[dict[str, Any]]] | None:
        entry = self._memory.get(response_id)
        if entry is not None:
            self._sizes.move_to_end(response_id)
        return entry

    async def _load(
        self, response_id: str, *, conversation: bool
    ) -> bytes | list[dict[str, Any]] | None:
        if not _is_id(response_id):
            return None
        assert self.directory is not None
        try:
            found = await asyncio.to_thread(_read, self.directory, response_id, conversation)
        except _Unreadable as exc:
            self._warn(response_id, exc)
            return None
        if found is None:  # deleted, maybe by another process
            self._forget(response_id)
        elif response_id in self._sizes:
            self._sizes.move_to_end(response_id)
        return found

    def _forget(self, response_id: str) -> None:
        size = self._sizes.pop(response_id, None)
        if size is not None:
            self.bytes -= size

    def _warn(self, response_id: str, exc: _Unreadable) -> None:
        if response_id in self._warned:
            return
        if len(self._warned) >= 10_000:
            self._warned.clear()
        self._warned.add(response_id)
        log.warning("stored response %s cannot be read, taken as not found: %s", response_id, exc)


_ID = re.compile(r"resp_[0-9a-f]{32}")
_SUFFIX = ".json"
_STALE_TEMP = 60.0  # seconds: a temporary file this old is a write that will never finish


def _is_id(response_id: str) -> bool:
    """The shape of the ids this module makes (`resp_` + 32 hex digits): nothing else names a
    file, so no path can be smuggled in."""
    return _ID.fullmatch(response_id) is not None


class _Stored(msgspec.Struct):
    """A stored response's file: its id, its JSON and its conversation's, as they were sent."""

    id: str
    response: msgspec.Raw
    conversation: msgspec.Raw


_read_stored = msgspec.json.Decoder(_Stored)
_read_conversation = msgspec.json.Decoder(list[dict[str, Any]])


class _Unreadable(Exception):
    """A stored response's file that does not read back as one."""


# In a thread: the file work of `ResponseStore` with a directory.


def _write(directory: Path, response_id: str, data: bytes, evicted: list[str]) -> None:
    for old in evicted:
        (directory / (old + _SUFFIX)).unlink(missing_ok=True)
    temp = directory / f".{response_id}.{os.getpid()}.tmp"
    try:
        try:
            temp.write_bytes(data)
        except FileNotFoundError:  # the directory was removed under us
            directory.mkdir(parents=True, exist_ok=True)
            temp.write_bytes(data)
        os.replace(temp, directory / (response_id + _SUFFIX))
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _parse(data: bytes, response_id: str) -> tuple[bytes, list[dict[str, Any]]]:
    """The response's JSON and its conversation, from its file's `data` (`_Unreadable`)."""
    try:
        record = _read_stored.decode(data)
        conversation = _read_conversation.decode(record.conversation)
    except msgspec.DecodeError as exc:
        raise _Unreadable(exc) from None
    if record.id != response_id:
        raise _Unreadable(f"it holds response {record.id!r}")
    return bytes(record.response), conversation


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _bytes_of(path: Path) -> bytes | None:
    """A stored response's file (None: there is none; `_Unreadable`: it cannot be read). Only
    a regular file: a symlink is not followed (it could name a file outside the folder, or
    /dev/zero) and a FIFO is not waited on (it would hold a thread of the pool forever)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink (ELOOP), no permission...
        raise _Unreadable(exc) from None
    try:
        with os.fdopen(fd, "rb") as file:
            if not S_ISREG(os.fstat(file.fileno()).st_mode):
                raise _Unreadable("not a regular file")
            return file.read()
    except OSError as exc:  # a folder by that name...
        raise _Unreadable(exc) from None


def _read(
    directory: Path, response_id: str, conversation: bool
) -> bytes | list[dict[str, Any]] | None:
    data = _bytes_of(directory / (response_id + _SUFFIX))
    if data is None:
        return None
    response, earlier = _parse(data, response_id)
    return earlier if conversation else response


def _remove(directory: Path, response_id: str) -> bool:
    """Remove the file; True if it held the response (one that does not is removed too, then
    `_Unreadable`)."""
    path = directory / (response_id + _SUFFIX)
    data = _bytes_of(path)
    if data is None:
        return False
    path.unlink(missing_ok=True)
    _parse(data, response_id)
    return True


def _stored_files(directory: Path) -> list[tuple[float, int, Path]]:
    """(modified, size, path) of each stored response in `directory`; stale temporary files
    are removed."""
    now = time.time()
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if name.startswith(".resp_") and name.endswith(".tmp"):
                if now - stat.st_mtime > _STALE_TEMP:
                    Path(entry.path).unlink(missing_ok=True)
            elif name.endswith(_SUFFIX) and _is_id(name[: -len(_SUFFIX)]):
                found.append((stat.st_mtime, stat.st_size, Path(entry.path)))
    return found


# -- the output ----------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesFormatter:
    """The Responses objects and events of one request (see the module docstring).

    Output items are streamed one at a time, in the order the parser finds them; an item is
    closed (its `.done` events) when the next one opens or the output ends.
    """

    done = b""
    n = 1

    def __init__(self, body: ResponsesRequest, call: ResponsesCall, store: ResponseStore) -> None:
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self._body = body
        self._call = call
        self._store = store
        self._seq = 0
        self._items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._pieces: list[str] = []
        self._status = "completed"
        self._final: tuple[bytes, list[dict[str, Any]]] | None = None

    # -- objects --------------------------------------------------------------------------

    def _response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self._body
        fmt = body.text.format if body.text is not None else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": self._items,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning or {"effort": None, "summary": None},
            "store": body.store is not False,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}},
            "tool_choice": (
                msgspec.to_builtins(body.tool_choice) if body.tool_choice is not None else "auto"
            ),
            "tools": msgspec.to_builtins(body.tools or []),
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "truncation": body.truncation or "disabled",
            "usage": usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def _complete(self, response: dict[str, Any]) -> bytes:
        """The final response's JSON, kept for `keep` (unless ``store: false``)."""
        data = _json.encode(response)
        if self._body.store is not False:
            self._final = (data, [*self._call.conversation, *_as_messages(self._items)])
        return data

    async def keep(self) -> None:
        """Store the finished response (after `usage` or `whole`) for follow-ups: awaited
        before the client can see it finished, so that a follow-up finds it on any process."""
        final, self._final = self._final, None
        if final is not None:
            await self._store.put(self.id, *final)

    # -- streamed -------------------------------------------------------------------------

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        fields["type"] = kind
        fields["sequence_number"] = self._seq
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _json.encode(fields) + b"\n\n"

    def start(self) -> bytes:
        created = self._response("in_progress")
        return self._event("response.created", {"response": created}) + self._event(
            "response.in_progress", {"response": created}
        )

    def text(self, text: str, i: int = 0) -> bytes:
        return self._delta("message", "response.output_text.delta", text, {"logprobs": []})

    def text_with_logprobs(self, text: str, logprobs: Any, i: int = 0) -> bytes:
        return self.text(text, i)  # log-probabilities are not offered on this route

    def _delta(self, kind: str, event: str, text: str, extra: dict[str, Any]) -> bytes:
        """Text for the open `kind` item (opened first if another kind is open)."""
        head = self._open_item(kind)
        item = self._open
        assert item is not None
        self._pieces.append(text)
        fields = {
            "item_id": item["id"],
            "output_index": len(self._items) - 1,
            "content_index": 0,
            "delta": text,
            **extra,
        }
        return head + self._event(event, fields)

    def events(self, events: list[Event], i: int = 0, logprobs: Any = None) -> bytes:
        parts = []
        for event in events:
            if isinstance(event, Content):
                parts.append(self.text(event.text))
            elif isinstance(event, Reasoning):
                parts.append(
                    self._delta("reasoning", "response.reasoning_text.delta", event.text, {})
                )
            elif isinstance(event, ToolCallStart):
                parts.append(self._close())
                item = {
                    "id": _new_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": event.id,
                    "name": event.name,
                    "arguments": "",
                }
                parts.append(self._add(item))
            elif self._open is not None and self._open["type"] == "function_call":
                self._pieces.append(event.text)
                fields = {
                    "item_id": self._open["id"],
                    "output_index": len(self._items) - 1,
                    "delta": event.text,
                }
                parts.append(self._event("response.function_call_arguments.delta", fields))
        return b"".join(parts)

    def _add(self, item: dict[str, Any]) -> bytes:
        self._items.append(item)
        self._open = item
        self._pieces = []
        return self._event(
            "response.output_item.added",
            {"output_index": len(self._items) - 1, "item": {**item}},
        )

    def _open_item(self, kind: str) -> bytes:
        """Open a `message` or `reasoning` item, unless one of that kind is open."""
        if self._open is not None and self._open["type"] == kind:
            return b""
        closed = self._close()
        if kind == "message":
            item: dict[str, Any] = {
                "id": _new_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part: dict[str, Any] = {
                "type": "output_text",
                "text": "",
                "annotations": [],
                "logprobs": [],
            }
        else:
            item = {
                "id": _new_id("rs"),
                "type": "reasoning",
                "status": "in_progress",
                "summary": [],
                "content": [],
            }
            part = {"type": "reasoning_text", "text": ""}
        added = self._add(item)
        return (
            closed
            + added
            + self._event(
                "response.content_part.added",
                {
                    "item_id": item["id"],
                    "output_index": len(self._items) - 1,
                    "content_index": 0,
                    "part": part,
                },
            )
        )

    def _close(self) -> bytes:
        """Close the open item: its `.done` events, its final shape in the output."""
        item = self._open
        if item is None:
            return b""
        self._open = None
        text = "".join(self._pieces)
        index = len(self._items) - 1
        where = {"item_id": item["id"], "output_index": index}
        if item["status"] == "in_progress":
            item["status"] = "completed"
        if item["type"] == "function_call":
            item["arguments"] = text
            events = self._event(
                "response.function_call_arguments.done", {**where, "arguments": text}
            )
        else:
            if item["type"] == "message":
                part: dict[str, Any] = {
                    "type": "output_text", "text": text, "annotations": [], "logprobs": []
                }  # fmt: skip
                done = self._event(
                    "response.output_text.done",
                    {**where, "content_index": 0, "text": text, "logprobs": []},
                )
            else:
                part = {"type": "reasoning_text", "text": text}
                done = self._event(
                    "response.reasoning_text.done", {**where, "content_index": 0, "text": text}
                )
            item["content"] = [part]
            events = done + self._event(
                "response.content_part.done", {**where, "content_index": 0, "part": part}
            )
        return events + self._event(
            "response.output_item.done", {"output_index": index, "item": item}
        )

    def finish(self, reason: str, i: int = 0) -> bytes:
        if reason == "length":
            self._status = "incomplete"
            if self._open is not None:
                self._open["status"] = "incomplete"
        return self._close()

    def usage(self, usage: dict[str, Any]) -> bytes:
        final = self._response(self._status, _usage(usage))
        self._complete(final)
        kind = "response.completed" if self._status == "completed" else "response.incomplete"
        return self._event(kind, {"response": final})

    def error(self, message: str, kind: str = "internal_error", code: str | None = None) -> bytes:
        failed = self._response("failed")
        failed["error"] = {"code": code or "server_error", "message": message}
        return self._event("error", {"code": code or kind, "message": message, "param": None}) + (
            self._event("response.failed", {"response": failed})
        )

    # -- whole ----------------------------------------------------------------------------

    def whole(self, choices: list[ChoiceResult], usage: dict[str, Any]) -> bytes:
        choice = choices[0]
        if choice.reasoning:
            self._items.append(
                {
                    "id": _new_id("rs"),
                    "type": "reasoning",
                    "status": "completed",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": choice.reasoning}],
                }
            )
        if choice.text or not choice.tool_calls:
            self._items.append(
                {
                    "id": _new_id("msg"),
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [
                        {
                            "type": "output_text",
                            "text": choice.text,
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            )
        for call in choice.tool_calls:
            self._items.append(
                {
                    "id": _new_id("fc"),
                    "type": "function_call",
                    "status": "completed",
                    "call_id": call.id,
                    "name": call.name,
                    "arguments": call.arguments,
                }
            )
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        return self._complete(self._response(status, _usage(usage)))


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage in the Responses shape."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        },
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _as_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output as the assistant message a follow-up's template shows."""
    text = "".join(
        part["text"]
        for item in items
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in items
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]
