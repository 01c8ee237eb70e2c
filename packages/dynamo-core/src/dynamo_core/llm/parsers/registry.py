"""Parser names, their factories, and the per-request composition of reasoning and tool parsing.

Names are Dynamo's (``--dyn-tool-call-parser`` / ``--dyn-reasoning-parser``); the names vLLM and
SGLang use for the same formats are accepted as aliases (``qwen25``, ``qwen3_xml``,
``deepseekv3``, ``gpt-oss``, ...). Lookup ignores case and treats ``-`` as ``_``; an unknown name
is a `ConfigError` that lists the valid names and suggests the closest one.

`ParserSpec` is what a model carries (validated once, when the model is registered or the frontend
starts); `ParserSpec.new_parser` makes one request's `OutputParser`: reasoning parsed first, then
tool calls in the content it leaves. gpt-oss is the exception: its harmony channels carry both,
so ``harmony`` and ``gpt_oss`` are one parser (``harmony`` alone also reports ``analysis`` as
reasoning, since it can be nothing else).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dynamo_core.errors import ConfigError
from dynamo_core.llm.parsers import reasoning as _reasoning
from dynamo_core.llm.parsers._base import (
    Content,
    Event,
    ParsedOutput,
    StreamParser,
    append_event,
    collect,
)
from dynamo_core.llm.parsers.harmony import HarmonyParser
from dynamo_core.llm.parsers.pythonic import PythonicParser
from dynamo_core.llm.parsers.tool_calls import (
    DeepSeekV3Parser,
    DeepSeekV31Parser,
    DeepSeekV32Parser,
    Glm45Parser,
    GraniteParser,
    HermesParser,
    JambaParser,
    KimiK2Parser,
    Llama3JsonParser,
    MiniMaxM2Parser,
    MistralParser,
    NemotronParser,
    Phi4Parser,
    Qwen3CoderParser,
)

__all__ = [
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "OutputParser",
    "ParserFamily",
    "ParserSpec",
    "get_reasoning_parser",
    "get_tool_call_parser",
    "parse_output",
    "reasoning_parser_names",
    "tool_call_parser_names",
]

Tools = Sequence[Mapping[str, Any]]
#: (the request's tools or None, a call-id generator or None) -> a fresh parser
ToolCallFactory = Callable[[Tools | None, Callable[[], str] | None], StreamParser]
#: (tool-call markup that ends an open reasoning block) -> a fresh parser
ReasoningFactory = Callable[[tuple[str, ...]], StreamParser]


@dataclass(frozen=True, slots=True)
class ParserFamily:
    """One registered format: its name, the other names engines give it, what it serves."""

    name: str
    factory: Callable[..., StreamParser]
    models: str
    aliases: tuple[str, ...] = ()
    harmony: bool = False
    #: Tool-call markup that also ends an open reasoning block (special tokens only).
    exits_reasoning: tuple[str, ...] = ()


def _think(fmt: _reasoning.ThinkFormat) -> ReasoningFactory:
    def make(exits: tuple[str, ...] = ()) -> StreamParser:
        return _reasoning.ThinkParser(fmt.with_exits(exits))

    return make


def _harmony_reasoning(exits: tuple[str, ...] = ()) -> StreamParser:
    return HarmonyParser(tool_calls=False)


_TOOL_FAMILIES = (
    ParserFamily(
        "hermes",
        HermesParser,
        "Qwen2.5, Qwen3, QwQ, Hermes 2 Pro / 3",
        ("qwen25", "qwen2_5", "qwen"),
    ),
    ParserFamily(
        "llama3_json", Llama3JsonParser, "Llama 3.1 / 3.2 / 3.3 (JSON)", ("llama3", "llama4_json")
    ),
    ParserFamily("mistral", MistralParser, "Mistral 7B v0.3, Nemo, Small 3.x, Magistral, Devstral"),
    ParserFamily("pythonic", PythonicParser, "Llama 3.2 / 4 (Python lists)", ("llama4_pythonic",)),
    ParserFamily(
        "deepseek_v3",
        DeepSeekV3Parser,
        "DeepSeek V3, R1, R1-0528",
        ("deepseekv3",),
        exits_reasoning=DeepSeekV3Parser.OPEN.markers,
    ),
    ParserFamily(
        "deepseek_v3_1",
        DeepSeekV31Parser,
        "DeepSeek V3.1",
        ("deepseek_v31", "deepseekv31"),
        exits_reasoning=DeepSeekV31Parser.OPEN.markers,
    ),
    ParserFamily(
        "qwen3_coder",
        Qwen3CoderParser,
        "Qwen3-Coder, Qwen3.5 (XML)",
        ("qwen3_xml", "nemotron_nano"),
    ),
    ParserFamily("harmony", HarmonyParser, "gpt-oss", ("gpt_oss", "openai"), harmony=True),
    ParserFamily(
        "kimi_k2",
        KimiK2Parser,
        "Kimi K2 / K2.5",
        ("kimi",),
        exits_reasoning=KimiK2Parser.OPEN.markers,
    ),
    ParserFamily("glm45", Glm45Parser, "GLM-4.5 / 4.6 / 4.7", ("glm47", "glm4_moe", "glm")),
    ParserFamily(
        "deepseek_v3_2",
        DeepSeekV32Parser,
        "DeepSeek V3.2, V3.2-Speciale (DSML)",
        ("deepseek_v32", "deepseekv32"),
        exits_reasoning=DeepSeekV32Parser.OPEN.markers,
    ),
    ParserFamily(
        "minimax_m2",
        MiniMaxM2Parser,
        "MiniMax-M2 / M2.1",
        exits_reasoning=MiniMaxM2Parser.OPEN.markers,
    ),
    ParserFamily(
        "granite",
        GraniteParser,
        "Granite 3.x (<|tool_call|>[...]), Granite 4 (<tool_call>{...}</tool_call>)",
        ("granite4", "granite3"),
        exits_reasoning=("<|tool_call|>",),
    ),
    ParserFamily("phi4", Phi4Parser, "Phi-4-mini (functools[...])", ("phi4_mini_json",)),
    ParserFamily("jamba", JambaParser, "Jamba 1.5 / 1.6 / 1.7 (<tool_calls>[...])"),
    ParserFamily(
        "nemotron_deci",
        NemotronParser,
        "Llama-Nemotron Nano / Super / Ultra (<TOOLCALL>[...])",
        ("llama_nemotron_json", "nemotron_json"),
    ),
)

_REASONING_FAMILIES = (
    ParserFamily("basic", _think(_reasoning.BASIC), "<think>...</think>", ("think",)),
    ParserFamily(
        "deepseek_r1",
        _think(_reasoning.DEEPSEEK_R1),
        "DeepSeek-R1, Qwen3-Thinking-2507, Nemotron Nano, MiniMax-M2 (starts inside <think>)",
        (
            "step3",
            "nemotron_nano",
            "nemotron3",
            "qwen3_thinking",
            "minimax_m2",
            "minimax_append_think",
            "minimax_m2_append_think",
        ),
    ),
    ParserFamily("qwen3", _think(_reasoning.BASIC), "Qwen3, QwQ (<think> optional)"),
    ParserFamily(
        "glm45", _think(_reasoning.BASIC), "GLM-4.5 / 4.6 / 4.7", ("glm47", "nemotron_deci")
    ),
    ParserFamily(
        "gpt_oss",
        _harmony_reasoning,
        "gpt-oss (harmony channels)",
        ("openai_gptoss",),
        harmony=True,
    ),
    ParserFamily("granite", _think(_reasoning.GRANITE), "Granite 3.2+"),
    ParserFamily("mistral", _think(_reasoning.MISTRAL), "Magistral ([THINK]...[/THINK])"),
    ParserFamily("kimi", _think(_reasoning.KIMI), "Kimi-VL thinking (◁think▷)"),
    ParserFamily("kimi_k25", _think(_reasoning.KIMI_K25), "Kimi K2 Thinking / K2.5 (<think>)"),
)


def _index(families: Sequence[ParserFamily]) -> dict[str, ParserFamily]:
    table = {f.name: f for f in families}
    for family in families:
        for alias in family.aliases:
            table.setdefault(alias, family)
    return table


TOOL_CALL_PARSERS: Mapping[str, ParserFamily] = {f.name: f for f in _TOOL_FAMILIES}
REASONING_PARSERS: Mapping[str, ParserFamily] = {f.name: f for f in _REASONING_FAMILIES}
_TOOL_LOOKUP = _index(_TOOL_FAMILIES)
_REASONING_LOOKUP = _index(_REASONING_FAMILIES)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _lookup(name: str, table: Mapping[str, ParserFamily], kind: str) -> ParserFamily:
    key = _normalize(name)
    family = table.get(key)
    if family is not None:
        return family
    valid = sorted({f.name for f in table.values()})
    close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
    hint = f" (did you mean {table[close[0]].name!r}?)" if close else ""
    raise ConfigError(f"unknown {kind} parser {name!r}{hint}; valid names: {', '.join(valid)}")


def get_tool_call_parser(name: str) -> ParserFamily:
    """The tool-call family registered as `name` (or an alias); `ConfigError` if none."""
    return _lookup(name, _TOOL_LOOKUP, "tool-call")


def get_reasoning_parser(name: str) -> ParserFamily:
    """The reasoning family registered as `name` (or an alias); `ConfigError` if none."""
    return _lookup(name, _REASONING_LOOKUP, "reasoning")


def tool_call_parser_names() -> list[str]:
    """The canonical tool-call parser names."""
    return sorted(TOOL_CALL_PARSERS)


def reasoning_parser_names() -> list[str]:
    """The canonical reasoning parser names."""
    return sorted(REASONING_PARSERS)


class OutputParser:
    """One request's parser: `feed` each text delta, `finish` at the end of the output.

    Reasoning is parsed first; the content it leaves goes through the tool-call parser. Events
    of the same kind that one call produces are merged (one content delta per feed, not one per
    piece), so the frontend sends at most one SSE chunk per kind per token.
    """

    __slots__ = ("_reasoning", "_tools")

    def __init__(self, reasoning: StreamParser | None, tools: StreamParser | None) -> None:
        self._reasoning = reasoning
        self._tools = tools

    def feed(self, text: str) -> list[Event]:
        if self._reasoning is None:
            if self._tools is None:
                return [Content(text)] if text else []
            return self._tools.feed(text)
        events = self._reasoning.feed(text)
        return events if self._tools is None else self._route(events, [])

    def finish(self) -> list[Event]:
        if self._reasoning is None:
            return [] if self._tools is None else self._tools.finish()
        events = self._reasoning.finish()
        if self._tools is None:
            return events
        out = self._route(events, [])
        for event in self._tools.finish():
            append_event(out, event)
        return out

    def parse(self, text: str) -> ParsedOutput:
        events = self.feed(text)
        for event in self.finish():
            append_event(events, event)
        return collect(events)

    def _route(self, events: list[Event], out: list[Event]) -> list[Event]:
        assert self._tools is not None
        for event in events:
            if type(event) is Content:
                for parsed in self._tools.feed(event.text):
                    append_event(out, parsed)
            else:
                append_event(out, event)
        return out


@dataclass(frozen=True, slots=True)
class ParserSpec:
    """The parsers a model uses, by name (canonicalized and checked when built)."""

    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        tool = get_tool_call_parser(self.tool_call_parser) if self.tool_call_parser else None
        think = get_reasoning_parser(self.reasoning_parser) if self.reasoning_parser else None
        if tool and think and tool.harmony != think.harmony:
            raise ConfigError(
                f"tool-call parser {tool.name!r} and reasoning parser {think.name!r} do not fit "
                "together: gpt-oss's harmony format needs 'harmony' with 'gpt_oss' (or either "
                "alone)"
            )
        object.__setattr__(self, "tool_call_parser", tool.name if tool else None)
        object.__setattr__(self, "reasoning_parser", think.name if think else None)

    def new_parser(
        self,
        *,
        tools: Tools | None = None,
        tool_calls: bool = True,
        call_id: Callable[[], str] | None = None,
    ) -> OutputParser:
        """A fresh parser for one request. `tools`: the request's tool definitions (the XML
        families type values by them); `tool_calls=False` leaves calls in the content (the
        request has no tools, or ``tool_choice: "none"``); `call_id`: how ids are made."""
        tool_name = self.tool_call_parser if tool_calls else None
        harmony = bool(
            (self.tool_call_parser and TOOL_CALL_PARSERS[self.tool_call_parser].harmony)
            or (self.reasoning_parser and REASONING_PARSERS[self.reasoning_parser].harmony)
        )
        if harmony:
            return OutputParser(
                None, HarmonyParser(tools, call_id, tool_calls=tool_name is not None)
            )
        family = TOOL_CALL_PARSERS[tool_name] if tool_name else None
        exits = family.exits_reasoning if family else ()
        think = REASONING_PARSERS[self.reasoning_parser] if self.reasoning_parser else None
        reasoning = think.factory(exits) if think else None
        return OutputParser(reasoning, family.factory(tools, call_id) if family else None)

    def parse(self, text: str, **options: Any) -> ParsedOutput:
        """The whole output at once (`new_parser` options apply)."""
        return self.new_parser(**options).parse(text)


def parse_output(
    text: str,
    *,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    tools: Tools | None = None,
    call_id: Callable[[], str] | None = None,
) -> ParsedOutput:
    """Parse a whole output with the named parsers (a convenience over `ParserSpec`)."""
    spec = ParserSpec(tool_call_parser, reasoning_parser)
    return spec.new_parser(tools=tools, call_id=call_id).parse(text)
