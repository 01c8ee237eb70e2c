"""dynamo_core.llm.parsers: goldens per family (written from each family's published format),
streaming against whole-text parsing over random splits (hypothesis), hold-back, the registry.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamo_core.llm.parsers as parsers
from dynamo_core.errors import ConfigError
from dynamo_core.llm.parsers import (
    Content,
    Event,
    ParsedOutput,
    ParserSpec,
    Reasoning,
    ToolCall,
    ToolCallArguments,
    ToolCallStart,
    collect,
    parse_output,
)


def _ds(name: str) -> str:
    """DeepSeek's markers: U+FF5C bars, U+2581 for the spaces."""
    return "<\uff5c" + name.replace("_", "\u2581") + "\uff5c>"


DS = _ds("tool_calls_begin"), _ds("tool_call_begin"), _ds("tool_sep")
DS_END = _ds("tool_call_end"), _ds("tool_calls_end")
#: DeepSeek V3.2's DSML tags: `<|DSML|invoke ...>` with U+FF5C bars.
DSML = "\uff5cDSML\uff5c"

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "hours": {"type": "array", "items": {"type": "integer"}},
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    },
    {"type": "function", "name": "write_file", "parameters": {"properties": {"path": {}}}},
]


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


@dataclass
class Case:
    """One golden: the output text and what it must parse to (call ids from `ids()`)."""

    tool: str | None
    reasoning: str | None
    text: str
    content: str = ""
    thinking: str = ""
    calls: list[tuple[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    call_ids: list[str] | None = None
    #: arguments compared as text (as the model wrote them) or as JSON values
    exact_args: bool = False

    def spec(self) -> ParserSpec:
        return ParserSpec(self.tool, self.reasoning)

    def new(self) -> parsers.OutputParser:
        return self.spec().new_parser(tools=self.tools, call_id=ids())

    def check(self, out: ParsedOutput) -> None:
        assert out.content == self.content
        assert out.reasoning == self.thinking
        assert [c.name for c in out.tool_calls] == [name for name, _ in self.calls]
        for call, (_, args) in zip(out.tool_calls, self.calls, strict=True):
            if self.exact_args:
                assert call.arguments == args
            else:
                assert json.loads(call.arguments) == args
        expected_ids = self.call_ids or [f"call_{i}" for i in range(len(self.calls))]
        assert [c.id for c in out.tool_calls] == expected_ids


W = {"city": "Paris"}
CASES: dict[str, Case] = {
    # -- hermes (Qwen 2.5 / 3) -------------------------------------------------------------
    "hermes_single": Case(
        "hermes",
        None,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        calls=[("get_weather", '{"city": "Paris"}')],
        exact_args=True,
    ),
    "hermes_text_then_parallel": Case(
        "hermes",
        None,
        "Let me check both.\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tōkyō 東京 🌧"}}\n</tool_call>',
        content="Let me check both.\n\n",
        calls=[("get_weather", W), ("get_weather", {"city": "Tōkyō 東京 🌧"})],
    ),
    "hermes_braces_in_strings": Case(
        "hermes",
        None,
        '<tool_call>\n{"name": "run", "arguments": {"code": "if (a) { b[\\"}\\"] = \'{\'; }", '
        '"nested": {"x": [1, {"y": "]}"}]}}}\n</tool_call>',
        calls=[("run", {"code": "if (a) { b[\"}\"] = '{'; }", "nested": {"x": [1, {"y": "]}"}]}})],
    ),
    "hermes_text_after": Case(
        "hermes",
        None,
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\nDone.',
        content="Done.",
        calls=[("f", {})],
    ),
    "hermes_name_not_first": Case(
        "hermes",
        None,
        '<tool_call>{"arguments": {"a": "x"}, "name": "f"}</tool_call>',
        calls=[("f", {"a": "x"})],
    ),
    "hermes_string_arguments": Case(
        "hermes",
        None,
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        calls=[("f", {"a": 1})],
    ),
    "hermes_not_json": Case(
        "hermes",
        None,
        "Use <tool_call>like this</tool_call> to call.",
        content="Use <tool_call>like this</tool_call> to call.",
    ),
    "hermes_bad_json": Case(
        "hermes",
        None,
        '<tool_call>{"oops": }</tool_call> after',
        content='<tool_call>{"oops": }</tool_call> after',
    ),
    "hermes_truncated_head": Case(
        "hermes", None, 'Sure <tool_call>{"na', content='Sure <tool_call>{"na'
    ),
    "hermes_truncated_args": Case(
        "hermes",
        None,
        '<tool_call>{"name": "f", "arguments": {"a": "par',
        calls=[("f", '{"a": "par')],
        exact_args=True,
    ),
    "hermes_missing_end_tag": Case(
        "hermes",
        None,
        '<tool_call>{"name": "f", "arguments": {"a": 1}}',
        calls=[("f", {"a": 1})],
    ),
    "hermes_with_qwen3_thinking": Case(
        "hermes",
        "qwen3",
        "<think>\nThe user wants weather. I'll call <tool_call> now.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        thinking="The user wants weather. I'll call <tool_call> now.",
        calls=[("get_weather", W)],
    ),
    "hermes_end_tag_inside_a_string": Case(
        "hermes",
        None,
        '<tool_call>{"name": "echo", "arguments": {"text": "</tool_call><tool_call>"}}</tool_call>',
        calls=[("echo", {"text": "</tool_call><tool_call>"})],
    ),
    "hermes_broken_then_good": Case(
        "hermes",
        None,
        'a<tool_call>oops<tool_call>{"name": "f", "arguments": {}}</tool_call>',
        content="a<tool_call>oops",
        calls=[("f", {})],
    ),
    # -- llama3_json -----------------------------------------------------------------------
    "llama3_bare": Case(
        "llama3_json",
        None,
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        calls=[("get_weather", W)],
    ),
    "llama3_python_tag_multi": Case(
        "llama3_json",
        None,
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}}',
        calls=[("a", {"x": 1}), ("b", {})],
    ),
    "llama3_json_answer_is_content": Case(
        "llama3_json", None, '{"answer": 42, "name": "x"}', content='{"answer": 42, "name": "x"}'
    ),
    "llama3_plain_text": Case(
        "llama3_json", None, "  The capital is {Paris}.", content="  The capital is {Paris}."
    ),
    "llama3_text_after_calls": Case(
        "llama3_json",
        None,
        '{"name": "f", "parameters": {}}\n\nHere you go.',
        content="Here you go.",
        calls=[("f", {})],
    ),
    # -- mistral ---------------------------------------------------------------------------
    "mistral_v3_array": Case(
        "mistral",
        None,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}}]',
        calls=[("get_weather", W), ("get_time", {"zone": "CET"})],
    ),
    "mistral_v11": Case(
        "mistral",
        None,
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
        content="Checking.",
        calls=[("get_weather", W), ("get_time", {})],
    ),
    "mistral_v13_call_id": Case(
        "mistral",
        None,
        '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}',
        calls=[("get_weather", W)],
        call_ids=["a1B2c3D4e"],
    ),
    "mistral_not_calls": Case(
        "mistral", None, "[TOOL_CALLS] is the token", content="[TOOL_CALLS] is the token"
    ),
    "mistral_with_think": Case(
        "mistral",
        "mistral",
        '[THINK]Need weather.[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        thinking="Need weather.",
        calls=[("get_weather", W)],
    ),
    # -- pythonic --------------------------------------------------------------------------
    "pythonic_parallel": Case(
        "pythonic",
        None,
        '[get_weather(city="Paris", days=3, metric=True, note=None), '
        "get_time(zone='CET', hours=[1, -2], extra={'a': (1, 2)})]",
        calls=[
            ("get_weather", {"city": "Paris", "days": 3, "metric": True, "note": None}),
            ("get_time", {"zone": "CET", "hours": [1, -2], "extra": {"a": [1, 2]}}),
        ],
    ),
    "pythonic_llama4_tags": Case(
        "pythonic",
        None,
        '<|python_start|>[get_weather(city="Pa]ris)")]<|python_end|>',
        calls=[("get_weather", {"city": "Pa]ris)"})],
    ),
    "pythonic_triple_quoted": Case(
        "pythonic",
        None,
        '[write_file(path="a.py", content="""def f(x):\n    return \'"\' + x + "]) \\"\\"\\""\n"""), '
        "note(text='''He said \"''\" and 'it'.''', empty=\"\")]",
        calls=[
            (
                "write_file",
                {"path": "a.py", "content": 'def f(x):\n    return \'"\' + x + "]) """"\n'},
            ),
            ("note", {"text": "He said \"''\" and 'it'.", "empty": ""}),
        ],
    ),
    "pythonic_prose": Case(
        "pythonic", None, "[see(below)] and [1, 2]", content="[see(below)] and [1, 2]"
    ),
    "pythonic_markdown_link": Case(
        "pythonic", None, "[Paris](https://x.y) is nice", content="[Paris](https://x.y) is nice"
    ),
    # -- deepseek --------------------------------------------------------------------------
    "deepseek_v3_r1": Case(
        "deepseek_v3",
        "deepseek_r1",
        "The user wants weather.\n</think>\n\nLet me look."
        f"{DS[0]}{DS[1]}function{DS[2]}get_weather\n```json\n"
        '{"city": "Paris"}\n```'
        f"{DS_END[0]}{DS[1]}function{DS[2]}get_time\n```json\n{{}}\n```{DS_END[0]}{DS_END[1]}",
        content="Let me look.",
        thinking="The user wants weather.",
        calls=[("get_weather", W), ("get_time", {})],
    ),
    "deepseek_v3_1": Case(
        "deepseek_v3_1",
        None,
        f'{DS[0]}{DS[1]}get_weather{DS[2]}{{"city": "Paris"}}{DS_END[0]}{DS_END[1]}',
        calls=[("get_weather", W)],
    ),
    "deepseek_v3_bad_head": Case(
        "deepseek_v3",
        None,
        f"{DS[0]}{DS[1]}nonsense{DS_END[0]}{DS_END[1]} ok",
        content=f"{DS[0]}{DS[1]}nonsense{DS_END[0]}{DS_END[1]} ok",
    ),
    "deepseek_r1_calls_without_closing_think": Case(
        "deepseek_v3_1",
        "deepseek_r1",
        f'I need the weather.\n{DS[0]}{DS[1]}get_weather{DS[2]}{{"city": "Paris"}}{DS_END[0]}'
        f"{DS_END[1]}",
        thinking="I need the weather.",
        calls=[("get_weather", W)],
    ),
    # -- kimi_k2 ---------------------------------------------------------------------------
    "kimi_k2": Case(
        "kimi_k2",
        None,
        "I'll check.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}'
        "<|tool_call_end|><|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}"
        "<|tool_call_end|><|tool_calls_section_end|>",
        content="I'll check.",
        calls=[("get_weather", W), ("get_time", {})],
        call_ids=["functions.get_weather:0", "functions.get_time:1"],
    ),
    "kimi_k2_garbage_section": Case(
        "kimi_k2",
        None,
        "<|tool_calls_section_begin|>garbage<|tool_calls_section_end|>",
        content="<|tool_calls_section_begin|>garbage<|tool_calls_section_end|>",
    ),
    "kimi_k2_truncated": Case(
        "kimi_k2",
        None,
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        '<|tool_call_argument_begin|>{"a": "b',
        calls=[("f", '{"a": "b')],
        call_ids=["functions.f:0"],
        exact_args=True,
    ),
    "kimi_k2_thinking_left_open": Case(
        "kimi_k2",
        "kimi_k25",
        "<think>Call it.<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
        thinking="Call it.",
        calls=[("f", {})],
        call_ids=["functions.f:0"],
    ),
    # -- qwen3_coder -----------------------------------------------------------------------
    "qwen3_coder_typed": Case(
        "qwen3_coder",
        None,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nfalse\n</parameter>\n"
        "<parameter=hours>\n[1, 2]\n</parameter>\n<parameter=note>\nnull\n</parameter>\n"
        "</function>\n</tool_call>",
        calls=[
            (
                "get_weather",
                {
                    "city": "San Francisco",
                    "days": 3,
                    "metric": False,
                    "hours": [1, 2],
                    "note": None,
                },
            )
        ],
        tools=WEATHER_TOOLS,
    ),
    "qwen3_coder_code_value": Case(
        "qwen3_coder",
        None,
        "I'll write it.\n<tool_call>\n<function=write_file>\n<parameter=path>\n/tmp/a.py\n"
        '</parameter>\n<parameter=content>\ndef f():\n    return "</param" + "\\n"\n\n'
        "</parameter>\n</function>\n</tool_call>",
        content="I'll write it.\n",
        calls=[
            (
                "write_file",
                {"path": "/tmp/a.py", "content": 'def f():\n    return "</param" + "\\n"\n'},
            )
        ],
        tools=WEATHER_TOOLS,
    ),
    "qwen3_coder_end_tags_inside_a_value": Case(
        "qwen3_coder",
        None,
        "<tool_call>\n<function=write_file>\n<parameter=content>\n<p></parameter> stays\n"
        "</parameter>\nstays too\n</function> and </tool_call> as well\n</parameter>\n"
        "<parameter=path>\nt.xml\n</parameter>\n</function>\n</tool_call>\nDone.",
        content="Done.",
        calls=[
            (
                "write_file",
                {
                    "content": "<p></parameter> stays\n</parameter>\nstays too\n</function> and "
                    "</tool_call> as well",
                    "path": "t.xml",
                },
            )
        ],
        tools=WEATHER_TOOLS,
    ),
    "qwen3_coder_end_tag_at_the_end_of_the_output": Case(
        "qwen3_coder",
        None,
        "<tool_call>\n<function=f>\n<parameter=a>\nx</parameter> y\n</parameter>  \n",
        calls=[("f", {"a": "x</parameter> y"})],
    ),
    "qwen3_coder_missing_end_tag": Case(
        "qwen3_coder",
        None,
        "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n<parameter=city>\nParis\n"
        "</function>\n</tool_call>",
        calls=[("get_weather", {"days": 3, "city": "Paris"})],
        tools=WEATHER_TOOLS,
    ),
    "qwen3_coder_untyped_is_string": Case(
        "qwen3_coder",
        None,
        "<tool_call>\n<function=f>\n<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>",
        calls=[("f", {"n": "3"})],
    ),
    "qwen3_coder_truncated": Case(
        "qwen3_coder",
        None,
        "<tool_call>\n<function=f>\n<parameter=text>\nhello wor",
        calls=[("f", {"text": "hello wor"})],
    ),
    "qwen3_coder_not_a_function": Case(
        "qwen3_coder",
        None,
        "<tool_call> is a tag </tool_call>",
        content="<tool_call> is a tag </tool_call>",
    ),
    # -- glm45 -----------------------------------------------------------------------------
    "glm45": Case(
        "glm45",
        "glm45",
        "<think>Weather needed.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Beijing</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n"
        "</tool_call>",
        thinking="Weather needed.",
        calls=[("get_weather", {"city": "Beijing", "days": 2})],
    ),
    "glm47_compact_typed": Case(
        "glm45",
        None,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>42</arg_value>"
        "<arg_key>hours</arg_key><arg_value>[1, 2]</arg_value></tool_call>"
        "<tool_call>get_time</tool_call>",
        calls=[("get_weather", {"city": "42", "hours": [1, 2]}), ("get_time", {})],
        tools=WEATHER_TOOLS,
    ),
    "glm45_prose": Case(
        "glm45",
        None,
        "Write <tool_call> then the name.",
        content="Write <tool_call> then the name.",
    ),
    "glm45_truncated_string": Case(
        "glm45",
        None,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Bei",
        calls=[("get_weather", {"city": "Bei"})],
        tools=WEATHER_TOOLS,
    ),
    # -- granite ---------------------------------------------------------------------------
    "granite3_array": Case(
        "granite",
        None,
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}}]',
        calls=[("get_weather", W), ("get_time", {"zone": "CET"})],
    ),
    "granite31_tag_and_text": Case(
        "granite",
        None,
        'Checking.<tool_call>[{"arguments": {"city": "Paris"}, "name": "get_weather"}]\n\nDone.',
        content="Checking.Done.",
        calls=[("get_weather", W)],
    ),
    "granite4_one_tag_per_call": Case(
        "granite",
        None,
        'Both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        content="Both.\n",
        calls=[("get_weather", W), ("get_time", {})],
    ),
    "granite_thinking_left_open": Case(
        "granite",
        "granite",
        'Here is my thought process:\nNeed the weather.<|tool_call|>[{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}]',
        thinking="Need the weather.",
        calls=[("get_weather", W)],
    ),
    "granite_not_calls": Case(
        "granite", None, "<|tool_call|> [is a token]", content="<|tool_call|> [is a token]"
    ),
    "granite_truncated_args": Case(
        "granite",
        None,
        '<|tool_call|>[{"name": "f", "arguments": {"a": "par',
        calls=[("f", '{"a": "par')],
        exact_args=True,
    ),
    # -- phi4 (Phi-4-mini) ---------------------------------------------------------------------
    "phi4_mini": Case(
        "phi4",
        None,
        'functools[{"name": "get_weather", "arguments": {"city": "Paris", "hours": [[1, 2], [3]]}}, '
        '{"name": "get_time", "parameters": {"zone": "CET"}}]',
        calls=[
            ("get_weather", {"city": "Paris", "hours": [[1, 2], [3]]}),
            ("get_time", {"zone": "CET"}),
        ],
    ),
    "phi4_prose": Case(
        "phi4",
        None,
        "Use functools.lru_cache, or functools[0] if you must.",
        content="Use functools.lru_cache, or functools[0] if you must.",
    ),
    # -- jamba -----------------------------------------------------------------------------
    "jamba": Case(
        "jamba",
        None,
        'Sure. <tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {}}]</tool_calls>',
        content="Sure. ",
        calls=[("get_weather", W), ("get_time", {})],
    ),
    "jamba_not_a_call": Case(
        "jamba",
        None,
        '<tool_calls>[{"name": 1}]</tool_calls> and []',
        content='<tool_calls>[{"name": 1}]</tool_calls> and []',
    ),
    # -- nemotron_deci (Llama-Nemotron) ------------------------------------------------------
    "nemotron_deci": Case(
        "nemotron_deci",
        "nemotron_deci",
        '<think>Need the weather.</think>\n<TOOLCALL>[{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "CET"}}]</TOOLCALL>',
        thinking="Need the weather.",
        calls=[("get_weather", W), ("get_time", {"zone": "CET"})],
    ),
    "nemotron_deci_without_brackets": Case(
        "llama_nemotron_json",
        None,
        '<TOOLCALL>{"name": "get_weather", "arguments": {"city": "Paris"}}</TOOLCALL> Done.',
        content="Done.",
        calls=[("get_weather", W)],
    ),
    # -- deepseek_v3_2 (DSML) ----------------------------------------------------------------
    "deepseek_v3_2": Case(
        "deepseek_v3_2",
        "deepseek_r1",
        "Two cities.</think>\n\n"
        f'<{DSML}function_calls>\n<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true">San Francisco</{DSML}parameter>\n'
        f'</{DSML}invoke>\n<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true">New York</{DSML}parameter>\n'
        f"</{DSML}invoke>\n</{DSML}function_calls>",
        thinking="Two cities.",
        calls=[("get_weather", {"city": "San Francisco"}), ("get_weather", {"city": "New York"})],
    ),
    "deepseek_v3_2_string_attribute": Case(
        "deepseek_v3_2",
        None,
        f'Let me check.<{DSML}function_calls>\n<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true"> "Tōkyō" {{x}} </{DSML}parameter>\n'
        f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n'
        f'<{DSML}parameter name="hours" string="false">[1, 2]</{DSML}parameter>\n'
        f'<{DSML}parameter name="opts" string="false">{{"rain": true, "note": null}}</{DSML}parameter>\n'
        f'<{DSML}parameter name="bad" string="false">not json</{DSML}parameter>\n'
        f"</{DSML}invoke>\n</{DSML}function_calls>",
        content="Let me check.",
        calls=[
            (
                "get_weather",
                {
                    "city": ' "Tōkyō" {x} ',
                    "days": 3,
                    "hours": [1, 2],
                    "opts": {"rain": True, "note": None},
                    "bad": "not json",
                },
            )
        ],
        tools=WEATHER_TOOLS,
    ),
    "deepseek_v3_2_thinking_left_open": Case(
        "deepseek_v32",
        "deepseek_r1",
        f'I need the weather.\n\n<{DSML}function_calls>\n<{DSML}invoke name="f">\n'
        f"</{DSML}invoke>\n</{DSML}function_calls>",
        thinking="I need the weather.",
        calls=[("f", {})],
    ),
    "deepseek_v3_2_not_calls": Case(
        "deepseek_v3_2",
        None,
        f"<{DSML}function_calls>oops</{DSML}function_calls> ok",
        content=f"<{DSML}function_calls>oops</{DSML}function_calls> ok",
    ),
    "deepseek_v3_2_truncated": Case(
        "deepseek_v3_2",
        None,
        f'<{DSML}function_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="text" '
        'string="true">hello wor',
        calls=[("f", {"text": "hello wor"})],
    ),
    # -- minimax_m2 --------------------------------------------------------------------------
    "minimax_m2": Case(
        "minimax_m2",
        "minimax_m2",
        "Weather, twice.\n</think>\n\nChecking.\n<minimax:tool_call>\n"
        '<invoke name="get_weather">\n<parameter name="city">\n  San Francisco \n</parameter>\n'
        '<parameter name="days">3</parameter>\n<parameter name="hours">[1, 2]</parameter>\n'
        '</invoke>\n<invoke name="get_time">\n</invoke>\n</minimax:tool_call>',
        content="Checking.\n",
        thinking="Weather, twice.",
        calls=[
            ("get_weather", {"city": "San Francisco", "days": 3, "hours": [1, 2]}),
            ("get_time", {}),
        ],
        tools=WEATHER_TOOLS,
    ),
    "minimax_m2_untyped_is_text": Case(
        "minimax_m2",
        None,
        "<minimax:tool_call><invoke name=f><parameter name='n'>3</parameter>"
        "<parameter name=m> a \t\n  b </parameter></invoke></minimax:tool_call>",
        calls=[("f", {"n": "3", "m": "a \t\n  b"})],
    ),
    "minimax_m2_thinking_left_open": Case(
        "minimax_m2",
        "deepseek_r1",
        'Call it.<minimax:tool_call><invoke name="f"></invoke></minimax:tool_call>',
        thinking="Call it.",
        calls=[("f", {})],
    ),
    "minimax_m2_not_calls": Case(
        "minimax_m2",
        None,
        "<minimax:tool_call> is the tag </minimax:tool_call>",
        content="<minimax:tool_call> is the tag </minimax:tool_call>",
    ),
    # -- harmony (gpt-oss) ------------------------------------------------------------------
    "harmony_tool_call": Case(
        "harmony",
        "gpt_oss",
        "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>',
        thinking="Need to use function get_weather.",
        calls=[("get_weather", '{"city":"Paris"}')],
        exact_args=True,
    ),
    "harmony_final": Case(
        None,
        "gpt_oss",
        '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple.<|end|>'
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>",
        content="2 + 2 = 4.",
        thinking='User asks: "What is 2 + 2?" Simple.',
    ),
    "harmony_preamble_and_recipient_in_role": Case(
        "harmony",
        None,
        "<|channel|>commentary<|message|>**Plan**: write a file.<|end|>"
        "<|start|>assistant to=functions.write_file<|channel|>commentary json<|message|>"
        '{"path": "index.html"}<|call|>',
        content="**Plan**: write a file.",
        calls=[("write_file", {"path": "index.html"})],
    ),
    "harmony_call_without_tool_parsing": Case(
        None,
        "gpt_oss",
        "<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>',
        thinking="hm",
        content="<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json"
        '<|message|>{"a": 1}<|call|>',
    ),
    "harmony_truncated_header": Case(
        "harmony",
        "gpt_oss",
        "<|channel|>final<|message|>Hi.<|end|><|start|>assistant<|channel|>comm",
        content="Hi.",
    ),
    # -- reasoning alone -------------------------------------------------------------------
    "basic_no_think": Case(None, "basic", "Just an answer.", content="Just an answer."),
    "basic_interleaved": Case(
        None,
        "basic",
        "<think>a</think>b<think>c</think>d</think>e",
        content="bde",
        thinking="ac",
    ),
    "deepseek_r1_no_end": Case(
        None, "deepseek_r1", "<think>\nstill thinking", thinking="still thinking"
    ),
    "qwen3_empty_think": Case(None, "qwen3", "<think>\n\n</think>\n\nHello!", content="Hello!"),
    "granite": Case(
        None,
        "granite",
        "Here is my thought process:\nThe user greets.\nHere is my response:\nHello there!",
        content="Hello there!",
        thinking="The user greets.",
    ),
    "granite_plain": Case(
        None, "granite", "Here is the answer: 4.", content="Here is the answer: 4."
    ),
    "kimi_think": Case(None, "kimi", "◁think▷hmm◁/think▷Yes.", content="Yes.", thinking="hmm"),
}


def stream(parser: parsers.OutputParser, pieces: Sequence[str]) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.finish())
    return events


def split(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])]


@pytest.mark.parametrize("name", CASES)
def test_golden_whole(name: str) -> None:
    case = CASES[name]
    case.check(case.new().parse(case.text))


@pytest.mark.parametrize("name", CASES)
def test_golden_char_by_char(name: str) -> None:
    case = CASES[name]
    events = stream(case.new(), list(case.text))
    case.check(collect(events))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [e.index for e in starts] == list(range(len(case.calls)))


@pytest.mark.parametrize("name", CASES)
def test_golden_every_cut(name: str) -> None:
    """The text in two pieces, cut at every position (a marker, a tag, a value cut anywhere)."""
    case = CASES[name]
    for cut in range(1, len(case.text)):
        case.check(collect(stream(case.new(), [case.text[:cut], case.text[cut:]])))


@settings(max_examples=600, derandomize=True, database=None, deadline=None)
@given(name=st.sampled_from(sorted(CASES)), cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_any_split_agrees_with_whole(name: str, cuts: list[int]) -> None:
    case = CASES[name]
    case.check(collect(stream(case.new(), split(case.text, cuts))))


# Fragments of every family's markup, JSON, XML and prose: random texts built from them hit the
# state machines' edges (partial markers, broken headers, nesting) far more often than prose.
FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool", '{"name": "f", "arguments": ', '{"a": "}"}'],
    "llama3_json": ["<|python_tag|>", '{"name": "f", "parameters": {"x": [1]}}', "; ", "{"],
    "mistral": ["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "f", '{"a": 1}', "[", "]", ",", "abc12"],
    "pythonic": ["[", "f(", "a=1", ")", "]", ", ", "'x)'", "<|python_start|>", "<|python_end|>"],
    "deepseek_v3": [*DS, *DS_END, "function", "f\n```json\n", "```", '{"a": 1}'],
    "deepseek_v3_1": [*DS, *DS_END, "f", '{"a": {}}'],
    "kimi_k2": [
        "<|tool_calls_section_begin|>",
        "<|tool_call_begin|>",
        "functions.f:0",
        "<|tool_call_argument_begin|>",
        '{"a": "\\""}',
        "<|tool_call_end|>",
        "<|tool_calls_section_end|>",
    ],
    "qwen3_coder": [
        "<tool_call>",
        "\n<function=get_weather>\n",
        "<parameter=city>",
        "<parameter=days>",
        "\n",
        "</parameter>",
        "</function>",
        "</tool_call>",
        "3",
        "x",
        "\n<parameter=",
    ],
    "granite": [
        "<|tool_call|>",
        "<tool_call>",
        "</tool_call>",
        "[",
        "]",
        ",",
        '{"name": "f", "arguments": ',
        '{"a": [1, "]"]}',
        "}",
    ],
    "phi4": ["functools", "functo", "[", "]", ",", '{"name": "f", "arguments": {"a": 1}}', "{"],
    "jamba": ["<tool_calls>", "</tool_calls>", "[", "]", ",", '{"name": "f", "arguments": {}}'],
    "nemotron_deci": [
        "<TOOLCALL>",
        "</TOOLCALL>",
        "[",
        "]",
        ",",
        '{"name": "f", "parameters": {"x": "]"}}',
        '{"arguments": {}, "name": "g"}',
    ],
    "deepseek_v3_2": [
        f"<{DSML}function_calls>",
        f"</{DSML}function_calls>",
        f"<{DSML}invoke name=",
        '"get_weather">',
        f"<{DSML}parameter name=",
        '"city" string="true">',
        '"days" string="false">',
        '"hours">',
        f"</{DSML}parameter>",
        f"</{DSML}invoke>",
        "\n",
        "[1]",
        "3",
    ],
    "minimax_m2": [
        "<minimax:tool_call>",
        "</minimax:tool_call>",
        "<invoke name=",
        '"get_weather">',
        "<parameter name=",
        '"city">',
        "'days'>",
        "</parameter>",
        "</invoke>",
        "\n",
        "  ",
        "3",
    ],
    "glm45": [
        "<tool_call>",
        "get_weather",
        "<arg_key>",
        "days",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
        "</tool_call>",
        "\n",
        "[1]",
    ],
    "harmony": [
        "<|start|>assistant",
        "<|channel|>",
        "analysis",
        "final",
        "commentary to=functions.f",
        " <|constrain|>json",
        "<|message|>",
        "<|end|>",
        "<|call|>",
        "<|return|>",
    ],
}
COMMON = ["x", " ", "\n", '"', "\\", "{", "}", "<", "<think>", "</think>", "é", "🌧"]


@settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_markup_agrees_with_whole(data: st.DataObject) -> None:
    family = data.draw(st.sampled_from(sorted(FRAGMENTS)))
    reasoning = data.draw(st.sampled_from([None, "basic", "deepseek_r1"]))
    if family == "harmony":
        reasoning = data.draw(st.sampled_from([None, "gpt_oss"]))
    pieces = data.draw(st.lists(st.sampled_from(FRAGMENTS[family] + COMMON), max_size=30))
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=20))
    spec = ParserSpec(family, reasoning)
    whole = spec.new_parser(tools=WEATHER_TOOLS, call_id=ids()).parse(text)
    events = stream(spec.new_parser(tools=WEATHER_TOOLS, call_id=ids()), split(text, cuts))
    assert collect(events) == whole
    indexes = [e.index for e in events if isinstance(e, ToolCallStart)]
    assert indexes == list(range(len(whole.tool_calls)))


# Single characters that markup is made of, and a few whole markers: arbitrary text around them.
MARKUP_PIECES = st.sampled_from(
    [*"<>|[]{}()\"'\\/:;,=._ \n\tafnt01é🌧\u2581\uff5c", *DS, "<|", "|>", "<tool_call>", "<think>"]
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    tool=st.sampled_from([None, *parsers.tool_call_parser_names()]),
    text=st.lists(MARKUP_PIECES, max_size=60).map("".join),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
)
def test_arbitrary_text_never_raises_and_agrees(
    tool: str | None, text: str, cuts: list[int]
) -> None:
    spec = ParserSpec(tool, "gpt_oss" if tool == "harmony" else "deepseek_r1")
    whole = spec.parse(text, call_id=ids(), tools=WEATHER_TOOLS)
    assert (
        collect(stream(spec.new_parser(call_id=ids(), tools=WEATHER_TOOLS), split(text, cuts)))
        == whole
    )


def test_non_json_numbers_are_not_sent_as_json() -> None:
    out = parse_output(
        "<tool_call>f<arg_key>x</arg_key><arg_value>1e400</arg_value>"
        "<arg_key>y</arg_key><arg_value>NaN</arg_value></tool_call>",
        tool_call_parser="glm45",
    )
    assert json.loads(out.tool_calls[0].arguments) == {"x": "1e400", "y": "NaN"}
    text = '<tool_call>{"arguments": {"a": NaN}, "name": "f"}</tool_call>'
    assert parse_output(text, tool_call_parser="hermes") == ParsedOutput(content=text)


def test_streaming_sends_arguments_before_the_call_ends() -> None:
    parser = ParserSpec("hermes").new_parser(call_id=ids())
    assert parser.feed('Sure.<tool_call>\n{"name": "get_weather", ') == [Content("Sure.")]
    assert parser.feed('"arguments": {"city": "Pa') == [
        ToolCallStart(0, "call_0", "get_weather"),
        ToolCallArguments(0, '{"city": "Pa'),
    ]
    assert parser.feed('ris"}}\n</tool_call>') == [ToolCallArguments(0, 'ris"}')]
    assert parser.finish() == []


def test_xml_string_values_stream_as_written() -> None:
    parser = ParserSpec("qwen3_coder").new_parser(tools=WEATHER_TOOLS, call_id=ids())
    head = "<tool_call>\n<function=write_file>\n<parameter=content>\nline one\n"
    assert parser.feed(head) == [
        ToolCallStart(0, "call_0", "write_file"),
        ToolCallArguments(0, '{"content": "line one'),
    ]
    assert parser.feed("line two\n</par") == [ToolCallArguments(0, "\\nline two")]
    assert parser.feed("ameter>\n</function>\n</tool_call>") == [ToolCallArguments(0, '"}')]


def test_xml_value_end_tag_is_held_until_the_structure_decides() -> None:
    parser = ParserSpec("qwen3_coder").new_parser(call_id=ids())
    head = "<tool_call>\n<function=f>\n<parameter=text>\nuse </parameter>"
    assert parser.feed(head) == [
        ToolCallStart(0, "call_0", "f"),
        ToolCallArguments(0, '{"text": "use '),
    ]
    assert parser.feed("\n") == []  # a newline then a tag would end it: more text decides
    assert parser.feed("to close\n") == [ToolCallArguments(0, "</parameter>\\nto close")]
    assert parser.feed("</parameter>\n</function>") == [ToolCallArguments(0, '"}')]


def test_dsml_string_values_stream_and_json_values_wait() -> None:
    parser = ParserSpec("deepseek_v3_2").new_parser(tools=WEATHER_TOOLS, call_id=ids())
    head = f'<{DSML}function_calls>\n<{DSML}invoke name="get_weather">\n<{DSML}parameter name='
    assert parser.feed(head + '"city" string="true">Par') == [
        ToolCallStart(0, "call_0", "get_weather"),
        ToolCallArguments(0, '{"city": "Par'),
    ]
    assert parser.feed(f'is</{DSML}parameter>\n<{DSML}parameter name="days" string="false">1') == [
        ToolCallArguments(0, 'is"')
    ]
    assert parser.feed(f"2</{DSML}parameter>\n</{DSML}invoke>") == [
        ToolCallArguments(0, ', "days": 12}')
    ]


def test_minimax_value_whitespace_is_dropped_while_streaming() -> None:
    parser = ParserSpec("minimax_m2").new_parser(call_id=ids())
    head = '<minimax:tool_call><invoke name="f"><parameter name="city">\n  Pa'
    assert parser.feed(head) == [
        ToolCallStart(0, "call_0", "f"),
        ToolCallArguments(0, '{"city": "Pa'),
    ]
    assert parser.feed("ris  ") == [ToolCallArguments(0, "ris")]
    assert parser.feed(" la") == [ToolCallArguments(0, "   la")]
    assert parser.feed(" \n</parameter>") == [ToolCallArguments(0, '"')]


def test_json_list_calls_stream_their_arguments() -> None:
    parser = ParserSpec("jamba").new_parser(call_id=ids())
    assert parser.feed('<tool_calls>[{"name": "f", "arguments": {"a": "x') == [
        ToolCallStart(0, "call_0", "f"),
        ToolCallArguments(0, '{"a": "x'),
    ]
    assert parser.feed('y"}}, {"name": "g", "arguments": {}}]</tool_') == [
        ToolCallArguments(0, 'y"}'),
        ToolCallStart(1, "call_1", "g"),
        ToolCallArguments(1, "{}"),
    ]
    assert parser.feed("calls> ok") == [Content("ok")]


@pytest.mark.parametrize(
    ("tool", "reasoning", "first", "shown", "then", "released"),
    [
        ("hermes", None, "Hello <tool", "Hello ", "box", "<toolbox"),
        ("deepseek_v3", None, "a " + DS[0][:5], "a ", "s", DS[0][:5] + "s"),
        ("kimi_k2", None, "a <|tool_calls_sec", "a ", "x", "<|tool_calls_secx"),
        (None, "basic", "<think>a </th", "a", "e", " </the"),
        (None, "granite", "Here is", "", " fine", "Here is fine"),
        ("mistral", None, "x [TOOL", "x ", "S]", "[TOOLS]"),
        ("pythonic", None, "[get(", "", "1)]", "[get(1)]"),
        ("granite", None, "ok <|tool_", "ok ", "x", "<|tool_x"),
        ("phi4", None, "Use functo", "Use ", "rs", "functors"),
        ("jamba", None, "a <tool_c", "a ", "x", "<tool_cx"),
        ("nemotron_deci", None, "a <TOOL", "a ", "S", "<TOOLS"),
        ("deepseek_v3_2", None, "a <" + DSML[:3], "a ", "x", "<" + DSML[:3] + "x"),
        ("minimax_m2", None, "a <minimax:", "a ", "x", "<minimax:x"),
    ],
)
def test_hold_back_only_what_could_be_markup(
    tool: str | None, reasoning: str | None, first: str, shown: str, then: str, released: str
) -> None:
    parser = ParserSpec(tool, reasoning).new_parser()
    out = collect(parser.feed(first))
    assert out.content + out.reasoning == shown
    later = collect(parser.feed(then))
    assert later.content + later.reasoning == released


def test_plain_text_is_never_held() -> None:
    for tool in parsers.tool_call_parser_names():
        parser = ParserSpec(tool).new_parser()
        assert parser.feed("no markup here,") == [Content("no markup here,")]
        assert parser.feed(" still none.") == [Content(" still none.")]


def test_default_call_ids() -> None:
    out = parse_output(
        '<tool_call>{"name": "f", "arguments": {}}</tool_call>', tool_call_parser="hermes"
    )
    assert re.fullmatch(r"call_[0-9a-f]{24}", out.tool_calls[0].id)
    out = parse_output("[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[ARGS]{}", tool_call_parser="mistral")
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in out.tool_calls)
    assert out.tool_calls[0].id != out.tool_calls[1].id


def test_tool_parsing_off_leaves_calls_in_content() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    spec = ParserSpec("hermes", "qwen3")
    assert spec.parse("<think>x</think>" + text, tool_calls=False) == ParsedOutput(
        content=text, reasoning="x"
    )


def test_no_parsers_pass_text_through() -> None:
    parser = ParserSpec().new_parser()
    assert parser.feed("<tool_call>") == [Content("<tool_call>")]
    assert parser.feed("") == []
    assert parser.finish() == []


def test_feed_after_finish_is_an_error() -> None:
    parser = ParserSpec("hermes").new_parser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# -- registry --------------------------------------------------------------------------------


def test_names_and_aliases() -> None:
    assert parsers.tool_call_parser_names() == [
        "deepseek_v3",
        "deepseek_v3_1",
        "deepseek_v3_2",
        "glm45",
        "granite",
        "harmony",
        "hermes",
        "jamba",
        "kimi_k2",
        "llama3_json",
        "minimax_m2",
        "mistral",
        "nemotron_deci",
        "phi4",
        "pythonic",
        "qwen3_coder",
    ]
    assert parsers.reasoning_parser_names() == [
        "basic",
        "deepseek_r1",
        "glm45",
        "gpt_oss",
        "granite",
        "kimi",
        "kimi_k25",
        "mistral",
        "qwen3",
    ]
    for alias, name in [
        ("qwen25", "hermes"),
        ("qwen3_xml", "qwen3_coder"),
        ("deepseekv3", "deepseek_v3"),
        ("deepseek_v31", "deepseek_v3_1"),
        ("gpt-oss", "harmony"),
        ("llama4_pythonic", "pythonic"),
        ("GLM47", "glm45"),
        ("phi4_mini_json", "phi4"),
        ("llama_nemotron_json", "nemotron_deci"),
        ("deepseek_v32", "deepseek_v3_2"),
        ("deepseekv32", "deepseek_v3_2"),
        ("granite4", "granite"),
        ("minimax-m2", "minimax_m2"),
    ]:
        assert parsers.get_tool_call_parser(alias).name == name
    assert ParserSpec("qwen25", "deepseek-r1") == ParserSpec("hermes", "deepseek_r1")
    assert ParserSpec("minimax-m2", "minimax_m2") == ParserSpec("minimax_m2", "deepseek_r1")


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        parsers.get_tool_call_parser("hermse")
    message = str(err.value)
    assert "unknown tool-call parser 'hermse'" in message
    assert "did you mean 'hermes'?" in message
    assert "valid names: deepseek_v3, deepseek_v3_1, deepseek_v3_2, glm45, granite" in message
    with pytest.raises(ConfigError, match="unknown reasoning parser 'zzz'; valid names: basic"):
        ParserSpec(reasoning_parser="zzz")


def test_harmony_pairs_only_with_gpt_oss() -> None:
    with pytest.raises(ConfigError, match="harmony"):
        ParserSpec("harmony", "deepseek_r1")
    with pytest.raises(ConfigError, match="harmony"):
        ParserSpec("hermes", "gpt_oss")


def test_public_names() -> None:
    assert sorted(parsers.__all__) == [
        "Content",
        "Event",
        "OutputParser",
        "ParsedOutput",
        "ParserFamily",
        "ParserSpec",
        "Reasoning",
        "StreamParser",
        "ToolCall",
        "ToolCallArguments",
        "ToolCallStart",
        "collect",
        "get_reasoning_parser",
        "get_tool_call_parser",
        "new_call_id",
        "parse_output",
        "reasoning_parser_names",
        "tool_call_parser_names",
    ]


def test_events_are_merged_per_feed() -> None:
    parser = ParserSpec(None, "basic").new_parser()
    assert parser.feed("<think>a b c</think>x y") == [Reasoning("a b c"), Content("x y")]
    assert collect([ToolCallStart(0, "i", "f"), ToolCallArguments(0, "{}")]).tool_calls == [
        ToolCall("i", "f", "{}")
    ]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "text",
    [
        "<|start|>" + "x" * 600,
        "<|channel|>" + "x" * 600,
        "<|channel|>analysis<|message|>hm<|end|>" + "<|start|>assistant" * 40,
        "<|start|>" * 100,
    ],
    ids=["start", "channel", "starts after a message", "only starts"],
)
def test_harmony_a_header_without_a_message_is_content_and_ends(text: str) -> None:
    """A `<|start|>` or `<|channel|>` with no `<|message|>` in the next MAX_HEADER characters is
    shown as written: the body that follows used to stop at that same opener for ever (a
    609-character output hung the frontend's event loop)."""
    spec = ParserSpec("harmony", "gpt_oss")
    whole = spec.parse(text, tools=WEATHER_TOOLS, call_id=ids())
    assert whole.content is not None and whole.content.endswith("x" * 600 if "x" in text else "")
    for size in (1, 3, 64):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        events = stream(spec.new_parser(tools=WEATHER_TOOLS, call_id=ids()), pieces)
        assert collect(events) == whole
