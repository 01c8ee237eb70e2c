"""`/v1/responses` with the real `openai` client: text and message input, instructions, the
typed streaming events as `responses.stream` accumulates them, function tools through the
model's parsers, reasoning items, structured output, `previous_response_id` and its bounded
store. One process, mockers told what to say."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest

from _families import HERMES_CALL, WEATHER_TOOL
from _graph import Graph, in_process_graph, qwen_flags
from dynamo_core.frontend.responses import ResponseStore

WEATHER = {"type": "function", **WEATHER_TOOL["function"]}  # type: ignore[dict-item]

SCRIPT = [
    {"when": {"prompt": "<tool_response>\n18 C"}, "reply": "It is 18 C in Paris."},
    {"when": {"user": "weather", "tools": True}, "reply": "<think>\nWeather.\n</think>\n\n" + HERMES_CALL},
    {"when": {"prompt": "BE-TERSE"}, "reply": "Terse."},
    {"when": {"prompt_regex": "first question[\\s\\S]*Hello there![\\s\\S]*second question"}, "reply": "I remember."},
    {"when": {"user": "hello"}, "reply": "<think>\nA greeting.\n</think>\n\nHello there!"},
    {"when": {"user": "first question"}, "reply": "Hello there!"},
]  # fmt: skip


@pytest.fixture
async def graph(namespace: str, tmp_path: Path) -> AsyncIterator[Graph]:
    store = ResponseStore(max_responses=3, max_bytes=64 * 1024)
    qwen = qwen_flags(tmp_path, SCRIPT)
    async with in_process_graph(namespace, {"qwen": qwen}, responses_store=store) as g:
        yield g


async def test_text_input_whole_with_reasoning_and_usage(graph: Graph) -> None:
    r = await graph.client.responses.create(model="qwen", input="hello")
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == "Hello there!"
    reasoning, message = r.output
    assert reasoning.type == "reasoning"
    assert [c.text for c in reasoning.content or ()] == ["A greeting."]
    assert message.type == "message" and message.role == "assistant"
    assert r.usage is not None and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # kept: retrievable, deletable
    assert (await graph.client.responses.retrieve(r.id)).output_text == "Hello there!"
    await graph.client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        await graph.client.responses.retrieve(r.id)


async def test_message_input_and_instructions(graph: Graph) -> None:
    r = await graph.client.responses.create(
        model="qwen",
        instructions="BE-TERSE",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "anything"}]}],
    )
    assert r.output_text == "Terse." and r.instructions == "BE-TERSE"
    r = await graph.client.responses.create(
        model="qwen",
        input=[
            {"role": "developer", "content": "BE-TERSE"},
            {"type": "message", "role": "user", "content": "anything"},
        ],
    )
    assert r.output_text == "Terse."


async def test_the_stream_is_what_the_sdk_accumulates(graph: Graph) -> None:
    async with graph.client.responses.stream(model="qwen", input="hello") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    types = [e.type for e in events]
    reasoning_deltas = types.count("response.reasoning_text.delta")
    text_deltas = types.count("response.output_text.delta")
    assert reasoning_deltas > 1 and text_deltas > 1
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * reasoning_deltas,
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * text_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert text == final.output_text == "Hello there!"
    assert final.status == "completed" and final.usage is not None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_function_tools_through_the_models_parser(graph: Graph, stream: bool) -> None:
    body: dict[str, Any] = {"model": "qwen", "input": "weather in Paris?", "tools": [WEATHER]}
    if stream:
        async with graph.client.responses.stream(**body) as s:
            events = [e async for e in s]
            r = await s.get_final_response()
        types = [e.type for e in events]
        assert "response.function_call_arguments.delta" in types
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert [e.arguments for e in done] == ['{"city": "Paris"}']  # type: ignore[union-attr]
    else:
        r = await graph.client.responses.create(**body)
    reasoning, call = r.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.status == "completed"

    # the tool's answer goes back as a function_call_output, continuing the conversation
    follow = await graph.client.responses.create(
        model="qwen",
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}],
        tools=[WEATHER],
    )
    assert follow.output_text == "It is 18 C in Paris."
    # the same conversation, sent whole instead
    whole = await graph.client.responses.create(
        model="qwen",
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
        ],
        tools=[WEATHER],
    )  # fmt: skip
    assert whole.output_text == "It is 18 C in Paris."


async def test_forced_tool_choice_and_structured_text(graph: Graph) -> None:
    r = await graph.client.responses.create(
        model="qwen",
        input="plan",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    [call] = r.output
    assert call.type == "function_call" and isinstance(json.loads(call.arguments)["city"], str)

    class Trip(pydantic.BaseModel):
        city: str
        days: int

    parsed = await graph.client.responses.parse(model="qwen", input="a trip", text_format=Trip)
    assert isinstance(parsed.output_parsed, Trip)


async def test_previous_response_id_continues_and_is_bounded(graph: Graph) -> None:
    first = await graph.client.responses.create(model="qwen", input="first question")
    assert first.output_text == "Hello there!"
    second = await graph.client.responses.create(
        model="qwen", input="second question", previous_response_id=first.id
    )
    assert second.output_text == "I remember."
    assert second.previous_response_id == first.id
    # instructions are not carried over to a follow-up (OpenAI's rule)
    terse = await graph.client.responses.create(
        model="qwen", input="anything", instructions="BE-TERSE", previous_response_id=second.id
    )
    assert terse.output_text == "Terse."
    after = await graph.client.responses.create(
        model="qwen", input="and now?", previous_response_id=terse.id, max_output_tokens=8
    )
    assert after.output_text != "Terse."

    with pytest.raises(openai.NotFoundError) as info:
        await graph.client.responses.create(
            model="qwen", input="x", previous_response_id="resp_unknown"
        )
    assert info.value.code == "previous_response_not_found"
    assert "resp_unknown" in str(info.value)

    # the store holds 3: `first` and `second` were evicted by the later ones
    with pytest.raises(openai.NotFoundError):
        await graph.client.responses.create(model="qwen", input="x", previous_response_id=first.id)
    store = graph.service.responses_store
    assert len(store) == 3 and store.evicted == 1 and store.bytes <= store.max_bytes
    assert store.response(second.id) is not None

    # store: false keeps nothing
    unstored = await graph.client.responses.create(model="qwen", input="hello", store=False)
    with pytest.raises(openai.NotFoundError):
        await graph.client.responses.retrieve(unstored.id)


def test_the_store_is_bounded_in_bytes() -> None:
    store = ResponseStore(max_responses=100, max_bytes=1000)
    for i in range(10):
        store.put(f"r{i}", b"x" * 300, [{"role": "user", "content": "hi"}])
    assert store.bytes <= 1000 and len(store) == 3
    assert store.response("r9") is not None and store.response("r0") is None
    store.put("huge", b"x" * 2000, [])
    assert store.response("huge") is None and len(store) == 3


async def test_max_output_tokens_makes_it_incomplete(graph: Graph) -> None:
    r = await graph.client.responses.create(model="qwen", input="hello", max_output_tokens=3)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    async with graph.client.responses.stream(
        model="qwen", input="first question", max_output_tokens=2
    ) as s:
        types = [e.type async for e in s]
    assert types[-1] == "response.incomplete"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_video"}]}]}, "input[0].content[0].type"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": 5}, "input"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 3}}}}, "text.format.schema"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"background": True}, "background"),
    ],
)  # fmt: skip
async def test_bad_requests_are_400s_naming_the_param(
    graph: Graph, body: dict[str, Any], param: str
) -> None:
    r = await graph.http.post("/v1/responses", json={"model": "qwen", "input": "x", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    r = await graph.http.post("/v1/responses", json={"model": "nope", "input": "x"})
    assert r.status_code == 404
