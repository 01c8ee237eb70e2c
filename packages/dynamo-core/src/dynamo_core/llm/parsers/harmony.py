"""gpt-oss's harmony format: messages on channels, read as reasoning, content and tool calls.

The model's output continues a prompt that ends in ``<|start|>assistant``, so the first message
has no ``<|start|>``::

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

A message is ``[<|start|>role][ to=RECIPIENT]<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>
TYPE]<|message|>BODY`` ended by ``<|end|>``, ``<|call|>`` or ``<|return|>`` (the last two are
stop tokens, often cut from the text: the next ``<|start|>`` or the end of the output ends the
body too). Bodies go out as they are written:

- a message to ``functions.NAME`` (or any recipient on ``commentary``) is a tool call NAME whose
  arguments are the body; without tool parsing (``gpt_oss`` alone, ``tool_choice: none``) the
  message is left in the content as the model wrote it;
- ``analysis`` (the chain of thought, and built-in tools such as ``browser.search``) is reasoning;
- ``final`` and ``commentary`` without a recipient (preambles) are content.

Text is parsed, not tokens: the decode must keep special tokens (``skip_special_tokens=False``).
The ``openai-harmony`` package was not used: its encoding downloads its vocabulary on first use,
and it parses token ids, which the frontend's text path does not carry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dynamo_core.llm.parsers._base import Markers, ToolCallParser, skip_ws

__all__ = ["HarmonyParser"]

_MESSAGE = "<|message|>"
_ENDS = frozenset({"<|end|>", "<|call|>", "<|return|>"})
_BODY_END = Markers(*_ENDS, "<|start|>", "<|channel|>")
_HEADER_OPEN = Markers("<|start|>", "<|channel|>", "to=")
_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT = re.compile(r"(?<![\w.])to=([^\s<]+)")
MAX_HEADER = 512

_CONTENT, _REASONING, _CALL, _RAW = range(4)


class HarmonyParser(ToolCallParser):
    """Harmony messages -> reasoning, content and (with ``tool_calls``) tool calls."""

    __slots__ = ("_kind", "_state", "_tool_calls")

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        call_id: Callable[[], str] | None = None,
        *,
        tool_calls: bool = True,
    ) -> None:
        super().__init__(tools, call_id)
        self._tool_calls = tool_calls
        self._state = self._between_step
        self._kind = _CONTENT

    def _step(self, final: bool) -> bool:
        return self._state(final)

    def _between_step(self, final: bool) -> bool:
        """Between messages (and at the start): whitespace is dropped, a header begins."""
        buf = self._buf
        p = self._pos = skip_ws(buf, self._pos)
        if p == len(buf):
            return False
        marker = _HEADER_OPEN.at(buf, p)
        if marker == "":
            if final:
                self._pos = len(buf)  # the output stops in a header: markup, dropped
            return False
        self._state = self._header_step if marker else self._body_step
        self._kind = _CONTENT
        return True

    def _header_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        i = buf.find(_MESSAGE, pos, pos + MAX_HEADER)
        if i == -1:
            if len(buf) - pos < MAX_HEADER:
                if final:
                    self._pos = len(buf)
                return False
            # not a header after all: shown as written, its opener too (the body would stop
            # at a `<|start|>` or `<|channel|>` again, here, for ever)
            opener = _HEADER_OPEN.at(buf, pos) or ""
            self._kind = _CONTENT
            self._content(opener)
            self._pos = pos + len(opener)
            self._state = self._body_step
            return True
        header = buf[pos:i]
        self._pos = i + len(_MESSAGE)
        self._open_message(header)
        self._state = self._body_step
        return True

    def _open_message(self, header: str) -> None:
        channel_match = _CHANNEL.search(header)
        channel = channel_match.group(1) if channel_match else ""
        to = _RECIPIENT.search(header)
        recipient = to.group(1) if to else ""
        if recipient and (recipient.startswith("functions.") or channel == "commentary"):
            if self._tool_calls:
                self._kind = _CALL
                self._start_call(recipient.removeprefix("functions."))
            else:
                self._kind = _RAW
                self._content(header + _MESSAGE)
        elif channel == "analysis" or recipient:
            self._kind = _REASONING
        else:
            self._kind = _CONTENT

    def _body_step(self, final: bool) -> bool:
        buf, pos = self._buf, self._pos
        m = _BODY_END.find(buf, pos)
        if m is None:
            end = len(buf) if final else _BODY_END.hold(buf, pos)
            self._emit(buf[pos:end])
            self._pos = end
            return False
        self._emit(buf[pos : m.start()])
        marker = m.group()
        if marker in _ENDS:
            self._pos = m.end()
            if self._kind == _RAW:
                self._content(marker)
        else:
            self._pos = m.start()  # the next message's header
        self._state = self._between_step
        return True

    def _emit(self, text: str) -> None:
        kind = self._kind
        if kind == _REASONING:
            self._reasoning(text)
        elif kind == _CALL:
            self._args(text)
        else:
            self._content(text)
