"""What each parser family's model writes when it calls a tool or thinks, for end-to-end tests:
the mocker is told to say it (`--reply-script`), the frontend must parse it. The texts follow
each family's published format (the same goldens the parser unit tests check)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def _ds(name: str) -> str:
    """DeepSeek's markers: U+FF5C bars, U+2581 for the spaces."""
    return "<\uff5c" + name.replace("_", "\u2581") + "\uff5c>"


CITY = {"city": "Paris"}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@dataclass(frozen=True)
class Family:
    """A model family: its parsers, what it says with tools, and what it says without."""

    tool_call_parser: str | None
    reasoning_parser: str | None
    call: str
    """The reply when the request has tools: a call of get_weather(city="Paris")."""
    call_content: str = ""
    call_reasoning: str = ""
    answer: str = "It is sunny."
    """The reply without tools."""
    answer_content: str = "It is sunny."
    answer_reasoning: str = ""
    call_ids: list[str] = field(default_factory=list)

    def script(self, path: Path) -> Path:
        """A `--reply-script` file: the call when tools are given, the answer otherwise."""
        rules = [
            {"when": {"tools": True}, "reply": self.call},
            {"reply": self.answer},
        ]
        path.write_text(json.dumps(rules), encoding="utf-8")
        return path

    def flags(self) -> list[str]:
        out = []
        if self.tool_call_parser:
            out += ["--dyn-tool-call-parser", self.tool_call_parser]
        if self.reasoning_parser:
            out += ["--dyn-reasoning-parser", self.reasoning_parser]
        return out


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

FAMILIES: dict[str, Family] = {
    "hermes": Family(
        "hermes",
        "qwen3",
        "<think>\nThe user wants the weather.\n</think>\n\n" + HERMES_CALL,
        call_reasoning="The user wants the weather.",
        answer="<think>\nA greeting.\n</think>\n\nIt is sunny.",
        answer_reasoning="A greeting.",
    ),
    "llama3_json": Family(
        "llama3_json", None, '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    ),
    "mistral": Family(
        "mistral",
        "mistral",
        '[THINK]Need weather.[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        call_reasoning="Need weather.",
    ),
    "pythonic": Family("pythonic", None, '[get_weather(city="Paris")]'),
    "deepseek_v3": Family(
        "deepseek_v3",
        "deepseek_r1",
        "The user wants weather.\n</think>\n\nLet me look."
        f"{_ds('tool_calls_begin')}{_ds('tool_call_begin')}function{_ds('tool_sep')}"
        'get_weather\n```json\n{"city": "Paris"}\n```'
        f"{_ds('tool_call_end')}{_ds('tool_calls_end')}",
        call_content="Let me look.",
        call_reasoning="The user wants weather.",
        answer="Short.\n</think>\n\nIt is sunny.",
        answer_reasoning="Short.",
    ),
    "qwen3_coder": Family(
        "qwen3_coder",
        None,
        "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n</function>\n</tool_call>",
        call_content="I'll check.\n",
    ),
    "harmony": Family(
        "harmony",
        "gpt_oss",
        "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>',
        call_reasoning="Need to use function get_weather.",
        answer="<|channel|>analysis<|message|>Simple.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>",
        answer_reasoning="Simple.",
    ),
    "kimi_k2": Family(
        "kimi_k2",
        None,
        "I'll check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|>",
        call_content="I'll check.",
        call_ids=["functions.get_weather:0"],
    ),
    "glm45": Family(
        "glm45",
        "glm45",
        "<think>Weather needed.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n</tool_call>",
        call_reasoning="Weather needed.",
    ),
    "deepseek_v3_1": Family(
        "deepseek_v3_1",
        None,
        f"{_ds('tool_calls_begin')}{_ds('tool_call_begin')}get_weather{_ds('tool_sep')}"
        f'{{"city": "Paris"}}{_ds("tool_call_end")}{_ds("tool_calls_end")}',
    ),
    "deepseek_v3_2": Family(
        "deepseek_v3_2",
        "deepseek_r1",
        "The user wants weather.</think>\n\n<\uff5cDSML\uff5cfunction_calls>\n"
        '<\uff5cDSML\uff5cinvoke name="get_weather">\n'
        '<\uff5cDSML\uff5cparameter name="city" string="true">Paris</\uff5cDSML\uff5cparameter>\n'
        "</\uff5cDSML\uff5cinvoke>\n</\uff5cDSML\uff5cfunction_calls>",
        call_reasoning="The user wants weather.",
        answer="Short.</think>\n\nIt is sunny.",
        answer_reasoning="Short.",
    ),
    "minimax_m2": Family(
        "minimax_m2",
        "basic",
        '<think>Weather needed.</think>\n<minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n</invoke>\n</minimax:tool_call>',
        call_reasoning="Weather needed.",
    ),
    "granite": Family(
        "granite",
        None,
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ),
    "phi4": Family(
        "phi4", None, 'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    ),
    "jamba": Family(
        "jamba",
        None,
        'Sure.<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>',
        call_content="Sure.",
    ),
    "nemotron_deci": Family(
        "nemotron_deci",
        "nemotron_deci",
        '<think>Weather.</think>\n<TOOLCALL>[{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}]</TOOLCALL>',
        call_reasoning="Weather.",
    ),
    # reasoning alone
    "basic": Family(
        None,
        "basic",
        "unused",
        answer="<think>Thinking it over.</think>It is sunny.",
        answer_reasoning="Thinking it over.",
    ),
    "granite_reasoning": Family(
        None,
        "granite",
        "unused",
        answer="Here is my thought process:\nThe user asks.\nHere is my response:\nIt is sunny.",
        answer_reasoning="The user asks.",
    ),
}

TOOL_FAMILIES = [name for name, f in FAMILIES.items() if f.tool_call_parser]
