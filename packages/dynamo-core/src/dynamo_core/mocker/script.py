"""Reply scripts: tell the mocker what to say (`--reply-script FILE`), for tests and demos.

A script is a YAML (or JSON) list of rules; the first rule whose conditions all hold gives the
reply, word for word. A request no rule matches is answered as without a script (constrained
text for a `guided_decoding` request, the mocker's random tokens otherwise)::

    - when: {user: weather, tools: true}          # substring of the last user message
      reply: |-
        <tool_call>
        {"name": "get_weather", "arguments": {"city": "Paris"}}
        </tool_call>
    - when: {user_regex: "(?i)^hello\\b"}
      reply: "<think>A greeting.</think>Hello! How can I help?"
    - when: {prompt: "Translate"}                  # substring of the whole prompt text
      reply: Bonjour.
    - reply: I am a mock model.                     # no `when`: always (a catch-all)

Conditions (``when``, all optional, all must hold):

- ``user`` / ``user_regex``: a substring of, or a regex found (``re.search``) in, the last user
  message;
- ``prompt`` / ``prompt_regex``: the same on the whole prompt text, special tokens and the chat
  template's markup included;
- ``tools``: true when the prompt shows tools (the request had ``tools``), false when not.

The reply is text in whatever format the model family writes (reasoning in ``<think>`` tags,
tool calls in hermes ``<tool_call>`` tags, ...), so the frontend's reasoning and tool-call parsers
(`dynamo_core.llm.parsers`) can be driven end to end. It goes out as tokens of the model's own
tokenizer, which detokenize to exactly this text, followed by end-of-sequence; a reply longer
than `max_tokens` is cut there (finish reason `length`). A rule wins over a `guided_decoding`
constraint: the script is the test's own word (write replies that satisfy the schema when
testing structured output through a script).

How the mocker reads a prompt. It receives token ids, so it detokenizes them with the model's
tokenizer (only when a script is loaded: a test/demo feature, it costs one decode per request).
The last user message and the tools section are found with markers learned once from the
model's chat template (`ChatLayout.learn`), by rendering probe conversations: the text that
always precedes a user message's content and the text that always follows it, and a line of
the template's tools preamble (the longest line of text, outside JSON, that the template adds
when tools are given). A prompt that holds no user marker (a completions request) has the whole
prompt, without special tokens, as its "user message". A template that shows no tools text
leaves ``tools`` unusable: a script that uses it is refused at start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dynamo_core.args import load_yaml_file
from dynamo_core.errors import ConfigError

if TYPE_CHECKING:
    from dynamo_core.llm.chat_template import ChatTemplate

__all__ = ["ChatLayout", "PromptView", "ReplyRule", "ReplyScript", "When"]

_PROBE_USER = "zqxprobeuserone"
_PROBE_USER_2 = "zqxprobeusertwo"
_PROBE_ANSWER = "zqxprobeanswer"
_PROBE_TOOL = "zqxprobetool"


@dataclass(frozen=True)
class PromptView:
    """What a rule can match on."""

    text: str
    """The whole prompt, special tokens included."""
    user: str
    """The last user message (the prompt without special tokens when none is found)."""
    tools: bool | None
    """Whether the prompt shows tools (None: the chat layout cannot tell)."""


class When(BaseModel):
    """A rule's conditions: all of those given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str | None = Field(default=None, description="Substring of the last user message.")
    user_regex: re.Pattern[str] | None = Field(
        default=None, description="Regex searched in the last user message."
    )
    prompt: str | None = Field(default=None, description="Substring of the whole prompt.")
    prompt_regex: re.Pattern[str] | None = Field(
        default=None, description="Regex searched in the whole prompt."
    )
    tools: bool | None = Field(default=None, description="The request has tools (or not).")

    def holds(self, view: PromptView) -> bool:
        if self.user is not None and self.user not in view.user:
            return False
        if self.user_regex is not None and not self.user_regex.search(view.user):
            return False
        if self.prompt is not None and self.prompt not in view.text:
            return False
        if self.prompt_regex is not None and not self.prompt_regex.search(view.text):
            return False
        return self.tools is None or view.tools is self.tools


class ReplyRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: When = Field(default_factory=When)
    reply: str

    @field_validator("reply")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("a reply must not be empty")
        return value


class ReplyScript(BaseModel):
    """The rules, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[ReplyRule]

    @property
    def uses_tools(self) -> bool:
        return any(rule.when.tools is not None for rule in self.rules)

    @property
    def uses_user(self) -> bool:
        return any(r.when.user is not None or r.when.user_regex is not None for r in self.rules)

    def reply(self, view: PromptView) -> str | None:
        """The first matching rule's reply, or None."""
        for rule in self.rules:
            if rule.when.holds(view):
                return rule.reply
        return None

    @classmethod
    def parse(cls, data: Any, *, source: str = "the reply script") -> ReplyScript:
        """From the loaded YAML/JSON: a list of rules, or a map with a `rules` list."""
        if isinstance(data, dict) and set(data) == {"rules"}:
            data = data["rules"]
        if not isinstance(data, list):
            raise ConfigError(f"{source}: expected a list of rules ({{when: ..., reply: ...}})")
        try:
            return cls(rules=data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"][1:])  # drop the 'rules' prefix
            raise ConfigError(f"{source}: rule {where}: {err['msg']}") from None

    @classmethod
    def load(cls, path: Path) -> ReplyScript:
        return cls.parse(load_yaml_file(path, "--reply-script"), source=f"--reply-script {path}")


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: str, b: str, limit: int) -> int:
    n = 0
    while n < limit and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


@dataclass(frozen=True)
class ChatLayout:
    """Markers of a chat template's prompts (see the module docstring)."""

    user_open: str
    user_close: str
    tools_marker: str | None

    @classmethod
    def learn(cls, template: ChatTemplate) -> ChatLayout | None:
        """The layout of `template`'s prompts; None when probing fails (its prompts are then
        matched as a whole)."""
        try:
            one = template.render(
                [{"role": "user", "content": _PROBE_USER}], add_generation_prompt=False
            )
            three = template.render(
                [
                    {"role": "user", "content": _PROBE_USER},
                    {"role": "assistant", "content": _PROBE_ANSWER},
                    {"role": "user", "content": _PROBE_USER_2},
                ],
                add_generation_prompt=False,
            )
        except Exception:  # a template that refuses the probe: no layout, not a failure
            return None
        if one.count(_PROBE_USER) != 1 or three.count(_PROBE_USER_2) != 1:
            return None
        before1, after1 = one.split(_PROBE_USER)
        before2, after2 = three.split(_PROBE_USER_2)
        opener = before1[
            len(before1) - _common_suffix(before1, before2, min(len(before1), len(before2))) :
        ]
        closer = after1[: _common_prefix(after1, after2)]
        if not opener:
            return None
        return cls(opener, closer, cls._tools_marker(template, one))

    @staticmethod
    def _tools_marker(template: ChatTemplate, plain: str) -> str | None:
        tool = {
            "type": "function",
            "function": {
                "name": _PROBE_TOOL,
                "description": _PROBE_TOOL,
                "parameters": {"type": "object", "properties": {}},
            },
        }
        try:
            with_tools = template.render(
                [{"role": "user", "content": _PROBE_USER}],
                tools=[tool],
                add_generation_prompt=False,
            )
        except Exception:
            return None
        start = _common_prefix(plain, with_tools)
        end = len(with_tools) - _common_suffix(
            plain, with_tools, min(len(plain), len(with_tools)) - start
        )
        candidates = [line.split("{")[0].strip() for line in with_tools[start:end].splitlines()]
        candidates = [c for c in candidates if len(c) >= 4 and _PROBE_TOOL not in c]
        return max(candidates, key=len) if candidates else None

    def last_user(self, text: str) -> str | None:
        at = text.rfind(self.user_open)
        if at < 0:
            return None
        start = at + len(self.user_open)
        end = text.find(self.user_close, start) if self.user_close else -1
        return text[start:] if end < 0 else text[start:end]

    def has_tools(self, text: str) -> bool | None:
        return None if self.tools_marker is None else self.tools_marker in text
