"""Tool-call and reasoning parsers: pure functions over a model's output text.

A model names its parsers (the worker's ``--dyn-tool-call-parser`` / ``--dyn-reasoning-parser``,
carried in its model card); the frontend builds one `OutputParser` per request and feeds it the
detokenized text as it streams::

    spec = ParserSpec(tool_call_parser="hermes", reasoning_parser="qwen3")   # checked once
    parser = spec.new_parser(tools=request_tools)                            # per request
    for delta in text_deltas:
        for event in parser.feed(delta):     # Content | Reasoning | ToolCallStart | ToolCallArguments
            ...
    events = parser.finish()                 # what was held back, at the end of the output

    spec.parse(whole_text)                   # -> ParsedOutput(content, reasoning, tool_calls)

What holds for every parser and every split of the text into deltas:

- **incremental and whole-text parsing agree**: the events of any split aggregate to what
  `parse` returns for the whole text (the tests check this over random split points);
- **no partial markup reaches the content**: only a tail that could still become markup is
  held back, and it is released as soon as the next text shows it cannot;
- **malformed markup is content**: text that opens a call but does not turn out to be one goes
  to the content as the model wrote it;
- **arguments are JSON strings**, as OpenAI sends them; a call's `ToolCallArguments` fragments
  concatenate to its final arguments; ids are ``call_`` + 24 hex digits unless the family needs
  its own (Mistral's 9 alphanumerics, Kimi's ``functions.name:0``), and injectable for tests;
- **cost per delta is proportional to the delta** (no re-scan of the text so far, no regex
  compiled per request, no pydantic): see ``bench/parsers.py``.

The markup of most families is made of special tokens: decode with ``skip_special_tokens=False``
when a parser is set. `tool_choice` handling and the ``finish_reason: "tool_calls"`` decision
belong to the frontend (a parser only reports the calls it found).
"""

from __future__ import annotations

from dynamo_core.llm.parsers._base import (
    Content,
    Event,
    ParsedOutput,
    Reasoning,
    StreamParser,
    ToolCall,
    ToolCallArguments,
    ToolCallStart,
    collect,
    new_call_id,
)
from dynamo_core.llm.parsers.registry import (
    OutputParser,
    ParserFamily,
    ParserSpec,
    get_reasoning_parser,
    get_tool_call_parser,
    parse_output,
    reasoning_parser_names,
    tool_call_parser_names,
)

__all__ = [
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
