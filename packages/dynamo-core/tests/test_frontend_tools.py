"""The frontend's OpenAI surface in one process, with mockers told what to say: tool calls and
reasoning (`tool_choice` none/auto/required/named, streamed deltas as OpenAI sends them),
structured output (`response_format`, vLLM's `guided_*`), `n` choices, `GET /v1/models/{id}`,
validation as OpenAI's schema has it, and the metrics of all that. Every parser family, through
real processes and real clients: test_openai_clients.py."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from _families import HERMES_CALL, WEATHER_TOOL
from _graph import Graph, assert_param_error, in_process_graph, qwen_flags

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["CET", "UTC"]}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}  # type: ignore[index]

#: hermes (Qwen) markup with qwen3 reasoning; prompts no rule matches get the mocker's own text
#: (constrained text for a guided request)
SCRIPT = [
    {"when": {"user": "weather", "tools": True}, "reply": "<think>\nWeather.\n</think>\n\n" + HERMES_CALL},
    {"when": {"user": "markup"}, "reply": HERMES_CALL},
    {"when": {"user": "hello"}, "reply": "<think>\nA greeting.\n</think>\n\nHello!"},
]  # fmt: skip


@pytest.fixture
async def graph(namespace: str, tmp_path: Path) -> AsyncIterator[Graph]:
    qwen = qwen_flags(tmp_path, SCRIPT)
    async with in_process_graph(namespace, {"qwen": qwen, "org/plain": {}}) as g:
        yield g


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def streamed(stream: Any) -> dict[int, dict[str, Any]]:
    """Per choice: content, reasoning, tool calls (assembled from deltas), finish reason, and
    every delta as sent."""
    out: dict[int, dict[str, Any]] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            c = out.setdefault(
                choice.index,
                {"content": "", "reasoning": "", "calls": {}, "finish": None, "deltas": []},
            )
            delta = choice.delta
            c["deltas"].append(delta.model_dump(exclude_none=True))
            c["content"] += delta.content or ""
            c["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or ():
                slot = c["calls"].setdefault(call.index, {"id": None, "name": None, "args": ""})
                if call.id:
                    slot["id"] = call.id
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                if call.function and call.function.arguments:
                    slot["args"] += call.function.arguments
            if choice.finish_reason:
                c["finish"] = choice.finish_reason
    return out


# -- tool calls and reasoning -----------------------------------------------------------------


async def test_a_tool_call_whole(graph: Graph) -> None:
    r = await graph.client.chat.completions.create(
        model="qwen", messages=user("weather in Paris?"), tools=TOOLS
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert message.content is None and message.refusal is None
    assert message.reasoning_content == "Weather."  # type: ignore[attr-defined]
    [call] = message.tool_calls or []
    assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


async def test_a_tool_call_streams_as_openai_sends_it(graph: Graph) -> None:
    stream = await graph.client.chat.completions.create(
        model="qwen", messages=user("weather in Paris?"), tools=TOOLS, stream=True
    )
    [choice] = (await streamed(stream)).values()
    assert choice["finish"] == "tool_calls"
    assert choice["reasoning"] == "Weather." and choice["content"] == ""
    assert choice["calls"] == {0: {"id": choice["calls"][0]["id"], "name": "get_weather",
                                   "args": '{"city": "Paris"}'}}  # fmt: skip
    call_deltas = [d["tool_calls"][0] for d in choice["deltas"] if "tool_calls" in d]
    # the first names the call (id, type, name, empty arguments); the rest carry arguments only
    assert call_deltas[0] == {
        "index": 0,
        "id": choice["calls"][0]["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert len(call_deltas) > 2  # arguments stream as they come, not in one piece
    assert all(set(d) == {"index", "function"} for d in call_deltas[1:])
    assert all(set(d["function"]) == {"arguments"} for d in call_deltas[1:])
    # no markup ever reaches the content
    assert not any("<" in d.get("content", "") for d in choice["deltas"])


async def test_a_parser_that_fails_ends_its_stream_with_an_error_event_and_done(
    graph: Graph, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in an output parser: that stream ends as OpenAI ends a failed one (an error event,
    then `[DONE]`), its whole twin is a 500 in OpenAI's shape, and the next request is served."""
    from dynamo_core.llm.parsers.tool_calls import HermesParser

    def broken(self: Any, text: str) -> Any:
        raise RuntimeError("a parser bug")

    monkeypatch.setattr(HermesParser, "feed", broken)
    http = graph.http
    body = {"model": "qwen", "messages": user("weather in Paris?"), "tools": TOOLS}
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "internal_error" and "frontend" in error["message"]
    whole = await http.post("/v1/chat/completions", json=body)
    assert whole.status_code == 500 and "error" in whole.json()
    monkeypatch.undo()
    r = await graph.client.chat.completions.create(
        model="qwen", messages=user("weather in Paris?"), tools=TOOLS
    )
    assert r.choices[0].finish_reason == "tool_calls"


async def test_reasoning_without_tools_and_markup_when_tool_calls_are_off(graph: Graph) -> None:
    r = await graph.client.chat.completions.create(model="qwen", messages=user("hello"))
    message = r.choices[0].message
    assert (message.content, message.reasoning_content) == ("Hello!", "A greeting.")  # type: ignore[attr-defined]
    assert r.choices[0].finish_reason == "stop"
    # no tools, or tool_choice none: what looks like a call stays in the content
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r = await graph.client.chat.completions.create(
            model="qwen", messages=user("markup"), **extra
        )
        assert r.choices[0].message.content == HERMES_CALL
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_tool_choice_required_calls_a_tool_with_valid_arguments(
    graph: Graph, stream: bool
) -> None:
    body: dict[str, Any] = {"model": "qwen", "messages": user("plan my day"), "tools": TOOLS}
    for choice_value, parallel, expect in (
        ("required", None, None),
        ("required", False, None),
        ({"type": "function", "function": {"name": "get_time"}}, None, "get_time"),
    ):
        extra = {"parallel_tool_calls": parallel} if parallel is not None else {}
        r = await graph.client.chat.completions.create(
            **body, tool_choice=choice_value, stream=stream, seed=3, **extra
        )
        if stream:
            [c] = (await streamed(r)).values()
            calls = [(v["name"], v["args"], v["id"]) for _, v in sorted(c["calls"].items())]
            finish, content = c["finish"], c["content"]
        else:
            msg = r.choices[0].message
            calls = [(t.function.name, t.function.arguments, t.id) for t in msg.tool_calls or ()]  # type: ignore[union-attr]
            finish, content = r.choices[0].finish_reason, msg.content
        assert finish == "tool_calls" and not content
        assert calls and all(cid.startswith("call_") for _, _, cid in calls)
        if parallel is False or expect:
            assert len(calls) == 1
        for name, args, _ in calls:
            assert name == expect or (expect is None and name in SCHEMAS)
            jsonschema.validate(json.loads(args), SCHEMAS[name])


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "only allowed when 'tools'"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope' is not one of",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "function"),
        ({"tools": [{"type": "custom", "custom": {}}]}, "tools[0].type", "custom"),
    ],
)
async def test_tool_rules_are_400s_naming_the_param(
    graph: Graph, extra: dict[str, Any], param: str, needle: str
) -> None:
    r = await graph.http.post(
        "/v1/chat/completions", json={"model": "qwen", "messages": user("x"), **extra}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


# -- structured output ----------------------------------------------------------------------


class Trip(dict[str, Any]):
    SCHEMA = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 9},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["city", "days", "tags"],
        "additionalProperties": False,
    }


@pytest.mark.parametrize("model", ["qwen", "org/plain"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_response_format_json_schema_and_json_object(
    graph: Graph, model: str, stream: bool
) -> None:
    """The qwen model has parsers: under a constraint they are off (a JSON answer is content)."""
    for fmt, schema in (
        ({"type": "json_schema", "json_schema": {"name": "trip", "schema": Trip.SCHEMA}}, Trip.SCHEMA),
        ({"type": "json_object"}, {"type": "object"}),
    ):  # fmt: skip
        r = await graph.client.chat.completions.create(
            model=model,
            messages=user("a trip"),
            response_format=fmt,
            stream=stream,  # type: ignore[arg-type]
        )
        if stream:
            [c] = (await streamed(r)).values()
            text, finish = c["content"], c["finish"]
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop"
        jsonschema.validate(json.loads(text), schema)


async def test_guided_extensions_at_the_top_level_and_under_nvext(graph: Graph) -> None:
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"nvext": {"guided_regex": "[a-c]{3}-[0-9]{2}"}}, re.compile(r"[a-c]{3}-[0-9]{2}").fullmatch),
        ({"guided_grammar": 'root ::= "ab" | "cd"'}, lambda t: t in ("ab", "cd")),
        ({"guided_json": json.dumps(Trip.SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), Trip.SCHEMA) is None),
    ]  # fmt: skip
    for extra, accepts in cases:
        r = await graph.client.chat.completions.create(
            model="org/plain", messages=user("x"), extra_body=extra
        )
        assert accepts(r.choices[0].message.content), (extra, r.choices[0].message.content)
        c = await graph.client.completions.create(
            model="org/plain", prompt="x", max_tokens=200, extra_body=extra
        )
        assert accepts(c.choices[0].text), (extra, c.choices[0].text)
    metrics = await graph.metrics()
    for kind in ("choice", "regex", "grammar", "json"):
        line = f'dynamo_frontend_structured_output_requests_total{{kind="{kind}",model="org/plain"}} 2.0'
        assert line in metrics


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"pattern": "("}}}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)  # fmt: skip
async def test_a_bad_constraint_is_a_400_naming_it(
    graph: Graph, extra: dict[str, Any], param: str
) -> None:
    r = await graph.http.post(
        "/v1/chat/completions", json={"model": "org/plain", "messages": user("x"), **extra}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# -- n choices ---------------------------------------------------------------------------------


async def test_n_choices_whole_and_streamed(graph: Graph) -> None:
    body: dict[str, Any] = {
        "model": "org/plain",
        "messages": user("tell me"),
        "max_tokens": 6,
        "seed": 11,
        "extra_body": {"ignore_eos": True},
    }
    one = await graph.client.chat.completions.create(**body)
    r = await graph.client.chat.completions.create(**body, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage is not None and r.usage.completion_tokens == 18
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # type: ignore[union-attr]
    texts = [c.message.content for c in r.choices]
    # each choice has its own seed (seed + index): choice 0 is the n=1 answer, the others differ
    assert texts[0] == one.choices[0].message.content
    assert len(set(texts)) == 3

    stream = await graph.client.chat.completions.create(
        **body, n=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    per_choice: dict[int, str] = {}
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1, 2]
    for chunk in chunks:
        for c in chunk.choices:
            per_choice[c.index] = per_choice.get(c.index, "") + (c.delta.content or "")
    assert [per_choice[i] for i in range(3)] == texts
    finishes = [
        (c.choices[0].index, c.choices[0].finish_reason)
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    ]
    assert sorted(finishes) == [(0, "length"), (1, "length"), (2, "length")]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 18

    c = await graph.client.completions.create(
        model="org/plain", prompt="one two", max_tokens=3, n=2, echo=True, seed=1
    )
    assert [x.index for x in c.choices] == [0, 1]
    assert all(x.text.startswith("one two") for x in c.choices)
    assert c.usage is not None and c.usage.completion_tokens == 6


async def test_n_choices_each_parse_their_own_tool_calls(graph: Graph) -> None:
    r = await graph.client.chat.completions.create(
        model="qwen", messages=user("weather in Paris?"), tools=TOOLS, n=2
    )
    assert [c.finish_reason for c in r.choices] == ["tool_calls", "tool_calls"]
    ids = [c.message.tool_calls[0].id for c in r.choices]  # type: ignore[index]
    assert len(set(ids)) == 2
    stream = await graph.client.chat.completions.create(
        model="qwen", messages=user("weather in Paris?"), tools=TOOLS, n=2, stream=True
    )
    out = await streamed(stream)
    assert sorted(out) == [0, 1]
    assert all(c["calls"][0]["args"] == '{"city": "Paris"}' for c in out.values())


# -- models ------------------------------------------------------------------------------------


async def test_models_retrieve(graph: Graph) -> None:
    model = await graph.client.models.retrieve("qwen")
    assert (model.id, model.object, model.owned_by) == ("qwen", "model", "dynamo")
    assert (await graph.client.models.retrieve("org/plain")).id == "org/plain"
    assert (await graph.http.get("/v1/models/org%2Fplain")).json()["id"] == "org/plain"
    with pytest.raises(openai.NotFoundError) as info:
        await graph.client.models.retrieve("nope")
    assert info.value.code == "model_not_found"
    assert (await graph.http.post("/v1/models/qwen")).status_code == 405


# -- validation --------------------------------------------------------------------------------

CHAT = {"model": "org/plain", "messages": user("x"), "max_tokens": 2}
COMPLETION = {"model": "org/plain", "prompt": "x", "max_tokens": 2}


@pytest.mark.parametrize(
    ("route", "body", "param", "code"),
    [
        ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ("chat", {"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]}, "messages[0].content[0].type", "invalid_value"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "missing_required_parameter"),
        ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
        ("chat", {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}, "messages[0].content[0].type", "invalid_value"),
        ("chat", {"messages": ["hi"]}, "messages[0]", "invalid_type"),
        ("chat", {"logit_bias": [1, 2]}, "logit_bias", None),
        ("chat", {"logit_bias": {"12": 150}}, "logit_bias", None),
        ("chat", {"logit_bias": {"abc": 1}}, "logit_bias", None),
        ("chat", {"logit_bias": {"12": 5}}, "logit_bias", "unsupported_parameter"),
        ("chat", {"response_format": "json"}, "response_format", None),
        ("chat", {"response_format": {"type": "xml"}}, "response_format.type", None),
        ("chat", {"tool_choice": 5}, "tool_choice", None),
        ("chat", {"parallel_tool_calls": "x"}, "parallel_tool_calls", None),
        ("chat", {"max_tokens": "a"}, "max_tokens", None),
        ("completions", {"best_of": "x"}, "best_of", None),
        ("completions", {"best_of": 3}, "best_of", "unsupported_parameter"),
        ("completions", {"logprobs": 6}, "logprobs", None),
    ],
)  # fmt: skip
async def test_what_openai_refuses_is_a_400_naming_the_param(
    graph: Graph, route: str, body: dict[str, Any], param: str, code: str | None
) -> None:
    base = CHAT if route == "chat" else COMPLETION
    r = await graph.http.post(
        f"/v1/{route.replace('chat', 'chat/completions')}", json={**base, **body}
    )
    assert_param_error(r, param, code)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("chat", {"stream": None}),
        ("chat", {"logit_bias": {"12": 0}, "parallel_tool_calls": True}),
        ("chat", {"messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, *user("x")]}),
        ("chat", {"messages": [*user("x"), {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
        ("chat", {"response_format": {"type": "text"}, "stream_options": None}),
        ("completions", {"echo": None, "stream": None, "best_of": 1}),
        ("completions", {"logprobs": 5}),
    ],
)  # fmt: skip
async def test_what_openai_accepts_is_accepted(
    graph: Graph, route: str, body: dict[str, Any]
) -> None:
    base = CHAT if route == "chat" else COMPLETION
    r = await graph.http.post(
        f"/v1/{route.replace('chat', 'chat/completions')}", json={**base, **body}
    )
    assert r.status_code == 200, r.text


# -- metrics -----------------------------------------------------------------------------------


def count(metrics: str, **labels: str) -> float:
    """The value of the `dynamo_frontend_requests_total` sample with these labels (0 if none)."""
    for line in metrics.splitlines():
        if line.startswith("dynamo_frontend_requests_total{") and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_status_success_error_and_cancelled(graph: Graph) -> None:
    body: dict[str, Any] = {"model": "org/plain", "messages": user("x"), "max_tokens": 4}
    stream = await graph.client.chat.completions.create(**body, stream=True)
    assert [c async for c in stream]
    await graph.client.chat.completions.create(**body)
    metrics = await graph.metrics()
    assert count(metrics, model="org/plain", request_type="stream", status="success") == 1
    assert count(metrics, model="org/plain", request_type="unary", status="success") == 1
    assert count(metrics, status="cancelled") == 0

    # a client that goes away mid-stream
    slow = {**body, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    async with graph.http.stream("POST", "/v1/chat/completions", json=slow) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                break
    async with asyncio.timeout(5):
        while count(await graph.metrics(), status="cancelled") == 0:
            await asyncio.sleep(0.01)  # the server notices the disconnect on its own time
    assert (
        count(await graph.metrics(), model="org/plain", request_type="stream", status="cancelled")
        == 1
    )

    # a constraint the mocker cannot honour fails the request: an error
    bad = {"model": "org/plain", "messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {"type": "string"}}}}}  # fmt: skip
    r2 = await graph.http.post("/v1/chat/completions", json=bad)
    assert r2.status_code == 400
    assert count(await graph.metrics(), model="org/plain", status="error") == 1


async def test_tool_calls_and_structured_requests_are_counted(graph: Graph) -> None:
    await graph.client.chat.completions.create(
        model="qwen", messages=user("weather in Paris?"), tools=TOOLS
    )
    stream = await graph.client.chat.completions.create(
        model="qwen", messages=user("weather in Paris?"), tools=TOOLS, stream=True, n=2
    )
    assert [c async for c in stream]
    await graph.client.chat.completions.create(
        model="qwen", messages=user("plan"), tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )  # fmt: skip
    metrics = await graph.metrics()
    assert 'dynamo_frontend_tool_calls_total{model="qwen"} 4.0' in metrics
    assert (
        'dynamo_frontend_structured_output_requests_total{kind="tool_choice",model="qwen"} 1.0'
        in metrics
    )


async def test_n_choices_that_fail_at_once_are_one_clean_error(graph: Graph) -> None:
    """A constraint the engine refuses fails every choice before the response starts: one
    400, and the graph serves the next request."""
    bad = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {}}}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError):
            await graph.client.chat.completions.create(
                model="org/plain",
                messages=user("x"),
                n=4,
                response_format=bad,
                stream=stream,  # type: ignore[arg-type]
            )
    ok = await graph.client.chat.completions.create(
        model="org/plain", messages=user("x"), n=2, max_tokens=3
    )
    assert len(ok.choices) == 2
