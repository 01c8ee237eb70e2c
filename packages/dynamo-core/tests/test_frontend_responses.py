"""`/v1/responses` with the real `openai` client: text and message input, instructions, the
typed streaming events as `responses.stream` accumulates them, function tools through the
model's parsers, reasoning items, structured output, `previous_response_id` and its bounded
store, in memory and in a folder (each test on both). One process, mockers told what to say.
Then the store alone: two stores on one folder (two processes), eviction, a restart, garbage
files and ids that are not ours."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import openai
import pydantic
import pytest

from _families import HERMES_CALL, WEATHER_TOOL
from _graph import Graph, in_process_graph, qwen_flags
from dynamo_core.errors import ConfigError
from dynamo_core.frontend import responses
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


@pytest.fixture(params=["memory", "folder"])
async def graph(
    namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Graph]:
    folder = tmp_path / "responses" if request.param == "folder" else None
    store = ResponseStore(max_responses=3, max_bytes=64 * 1024, directory=folder)
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
    store = graph.service.responses_store
    stored_when_completed = []
    async with graph.client.responses.stream(model="qwen", input="hello") as stream:
        events = []
        async for event in stream:
            events.append(event)
            if event.type == "response.completed":  # it is stored by then: a follow-up finds it
                stored_when_completed.append(await store.response(event.response.id) is not None)
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
    assert stored_when_completed == [True]
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
    assert await store.response(second.id) is not None
    if store.directory is not None:  # evicted: its file is gone
        assert sorted(p.name for p in store.directory.iterdir()) == sorted(
            f"{r.id}.json" for r in (second, terse, after)
        )

    # store: false keeps nothing
    unstored = await graph.client.responses.create(model="qwen", input="hello", store=False)
    with pytest.raises(openai.NotFoundError):
        await graph.client.responses.retrieve(unstored.id)


async def test_ids_that_are_not_ours_are_404s(graph: Graph) -> None:
    for bad in ("../../etc/passwd", "resp_" + "0" * 31 + "/", "resp_.." + "0" * 30):
        path = "/v1/responses/" + quote(bad, safe="")
        for method in ("GET", "DELETE"):
            r = await graph.http.request(method, path)
            assert r.status_code == 404, (method, bad, r.text)
            assert r.json()["error"]["code"] == "response_not_found"
        body = {"model": "qwen", "input": "x", "previous_response_id": bad}
        r = await graph.http.post("/v1/responses", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "previous_response_not_found"


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


# -- the store alone -------------------------------------------------------------------------


def new_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("in_folder", [False, True], ids=["memory", "folder"])
async def test_the_store_is_bounded_in_count_and_bytes(tmp_path: Path, in_folder: bool) -> None:
    store = ResponseStore(
        max_responses=100, max_bytes=1000, directory=tmp_path / "a" if in_folder else None
    )
    ids = [new_id() for _ in range(10)]
    for rid in ids:
        await store.put(rid, b'"' + b"x" * 300 + b'"', CHAT)
    assert store.bytes <= 1000 and len(store) == 2 and store.evicted == 8
    assert await store.response(ids[9]) is not None and await store.response(ids[0]) is None
    assert await store.conversation(ids[9]) == CHAT
    huge = new_id()
    await store.put(huge, b'"' + b"x" * 2000 + b'"', [])
    assert await store.response(huge) is None and len(store) == 2
    counted = ResponseStore(max_responses=2, directory=tmp_path / "b" if in_folder else None)
    for rid in ids:
        await counted.put(rid, b"{}", CHAT)
    assert len(counted) == 2 and counted.evicted == 8
    assert [await counted.response(rid) is not None for rid in ids[-3:]] == [False, True, True]
    # the least recently *used* goes: reading ids[8] keeps it past the next put
    await counted.conversation(ids[8])
    await counted.put(new_id(), b"{}", CHAT)
    assert await counted.response(ids[8]) is not None and await counted.response(ids[9]) is None
    if in_folder:  # evicted: their files removed
        assert len(list((tmp_path / "a").iterdir())) == len(list((tmp_path / "b").iterdir())) == 2
    with pytest.raises(ValueError, match="not a response id"):
        await counted.put("../x", b"{}", CHAT)


async def test_storing_turned_off_keeps_nothing_and_says_nothing_per_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ResponseStore(max_responses=0)
    rid = new_id()
    with caplog.at_level(logging.WARNING, logger="dynamo"):
        await store.put(rid, b"{}", CHAT)
    assert await store.response(rid) is None and len(store) == 0
    assert caplog.records == []


async def test_two_stores_on_one_folder_share_it(tmp_path: Path) -> None:
    """Two processes: what one stores the other reads; what one deletes or evicts is gone for
    both; one that finds a response gone stops counting it."""
    a = ResponseStore(max_responses=2, directory=tmp_path)
    b = ResponseStore(max_responses=2, directory=tmp_path)
    first, second, third = new_id(), new_id(), new_id()
    await a.put(first, b'{"id": 1}', CHAT)
    await a.put(second, b'{"id": 2}', CHAT[:1])
    assert await b.response(first) == b'{"id": 1}'
    assert await b.conversation(second) == CHAT[:1]
    assert len(b) == 0  # b counts only what it stored
    assert await b.delete(first)
    assert await a.response(first) is None and await a.conversation(first) is None
    assert not await a.delete(first) and not await b.delete(first)
    assert len(a) == 1  # a has seen that `first` is gone
    await b.put(third, b'{"id": 3}', CHAT)
    await a.put(new_id(), b"{}", CHAT)
    await a.put(new_id(), b"{}", CHAT)  # a's third: evicts `second`, for both
    assert await b.response(second) is None
    assert await a.response(third) == b'{"id": 3}'  # b's, which a's bound does not touch
    assert len(list(tmp_path.iterdir())) == 3


async def test_a_folder_survives_a_restart_and_is_trimmed_at_start(tmp_path: Path) -> None:
    before = ResponseStore(directory=tmp_path)
    ids = [new_id() for _ in range(5)]
    for i, rid in enumerate(ids):
        await before.put(rid, b'{"n": %d}' % i, CHAT)
        os.utime(tmp_path / f"{rid}.json", (time.time() - 100 + i,) * 2)  # ids[4] the newest
    stale, fresh = tmp_path / f".{new_id()}.1.tmp", tmp_path / f".{new_id()}.2.tmp"
    stale.write_bytes(b"cut")
    os.utime(stale, (time.time() - 3600,) * 2)
    fresh.write_bytes(b"being written")  # by a live process: left alone
    other = tmp_path / "README"  # not ours: left alone
    other.write_text("x")

    after = ResponseStore(max_responses=2, directory=tmp_path)
    after.open(processes=2)  # keeps 2 x 2: the newest four
    assert len(after) == 0  # files it did not write are not counted as its own
    assert [await after.response(rid) for rid in ids] == [None, b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']  # fmt: skip
    assert await after.conversation(ids[4]) == CHAT
    assert not stale.exists() and fresh.exists() and other.exists()
    size = (tmp_path / f"{ids[4]}.json").stat().st_size  # each file's
    ResponseStore(max_bytes=2 * size + 1, directory=tmp_path).open()  # the newest two fit
    assert sorted(p.name for p in tmp_path.glob("resp_*")) == sorted(
        f"{rid}.json" for rid in ids[3:]
    )
    made = tmp_path / "a" / "b"
    ResponseStore(directory=made).open()
    assert made.is_dir()
    with pytest.raises(ConfigError, match="--responses-store-dir"):
        ResponseStore(directory=other).open()  # a file, not a folder


async def test_unreadable_files_are_not_found_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ResponseStore(directory=tmp_path)
    good = new_id()
    await store.put(good, b'{"ok": true}', CHAT)
    whole = (tmp_path / f"{good}.json").read_bytes()
    cases = {
        "garbage": b"\x00\xffnot json",
        "cut": whole[: len(whole) // 2],
        "another id": whole.replace(good.encode(), new_id().encode()),
        "bad conversation": whole.replace(b'"conversation":', b'"conversation":"x","c":'),
        "empty": b"",
    }
    caplog.set_level(logging.WARNING, "dynamo.frontend.responses")
    for what, data in cases.items():
        rid = new_id()
        (tmp_path / f"{rid}.json").write_bytes(data)
        for _ in range(2):
            assert await store.conversation(rid) is None, what
            assert await store.response(rid) is None, what
        assert not await store.delete(rid), what
        assert not (tmp_path / f"{rid}.json").exists(), what  # removed by the delete
        warned = [r for r in caplog.records if rid in r.getMessage()]
        assert len(warned) == 1, (what, [r.getMessage() for r in warned])
    folder = new_id()
    (tmp_path / f"{folder}.json").mkdir()  # not a file either
    assert await store.response(folder) is None and not await store.delete(folder)
    assert await store.response(good) == b'{"ok": true}'


async def test_ids_not_of_our_shape_never_reach_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"id": "secret"}')
    store = ResponseStore(directory=tmp_path / "store")

    def touched(*args: Any) -> None:
        raise AssertionError(f"the disk was touched for {args}")

    monkeypatch.setattr(responses, "_read", touched)
    monkeypatch.setattr(responses, "_remove", touched)
    for bad in ("../secret", "../../etc/passwd", "resp_" + "A" * 32, "resp_" + "0" * 31,
                "resp_" + "0" * 32 + "/", "resp_" + "0" * 32 + "\n", "/etc/passwd", ""):  # fmt: skip
        assert await store.response(bad) is None
        assert await store.conversation(bad) is None
        assert not await store.delete(bad)
    assert secret.exists()


async def test_file_work_runs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    for name in ("_write", "_read", "_remove"):
        real = getattr(responses, name)

        def spy(*args: Any, _real: Any = real) -> Any:
            threads.append(threading.current_thread().name)
            return _real(*args)

        monkeypatch.setattr(responses, name, spy)
    store = ResponseStore(directory=tmp_path)
    rid = new_id()
    await store.put(rid, b"{}", CHAT)
    await store.response(rid)
    await store.conversation(rid)
    await store.delete(rid)
    assert len(threads) == 4 and threading.main_thread().name not in threads


async def test_a_response_that_cannot_be_written_is_not_kept(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    store = ResponseStore(directory=folder)
    folder.write_text("a file where the folder was")
    rid = new_id()
    await store.put(rid, b"{}", CHAT)  # logged, not raised: the client still gets its answer
    assert len(store) == 0 and store.bytes == 0
    folder.unlink()
    await store.put(rid, b"{}", CHAT)  # the folder is made again
    assert await store.response(rid) == b"{}"


async def test_a_cancelled_put_still_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client left while its response was being written: the write finishes in its thread
    and the bookkeeping agrees with the folder."""
    started, go, written = threading.Event(), threading.Event(), threading.Event()
    real = responses._write

    def slow_write(*args: Any) -> None:
        started.set()
        go.wait(5)
        real(*args)
        written.set()

    monkeypatch.setattr(responses, "_write", slow_write)
    store = ResponseStore(max_responses=1, directory=tmp_path)
    first, second = new_id(), new_id()
    go.set()
    await store.put(first, b"{}", CHAT)
    started.clear()  # else the wait below may return before the second put has begun
    go.clear()
    written.clear()
    task = asyncio.ensure_future(store.put(second, b"{}", CHAT))
    assert await asyncio.to_thread(started.wait, 5)  # the write is in its thread
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    go.set()
    assert await asyncio.to_thread(written.wait, 5)
    assert len(store) == 1 and await store.response(second) == b"{}"
    assert await store.response(first) is None


async def test_links_and_special_files_in_the_folder_are_not_read(tmp_path: Path) -> None:
    """Another user's symlink, FIFO or device under a response's name is a 404 (logged), never
    followed: a FIFO would hold a thread of the pool forever, /dev/zero would fill the memory,
    and a link would serve a file from outside the folder."""
    store = ResponseStore(directory=tmp_path / "store")
    store.open()
    real = new_id()
    await store.put(real, b'{"ok": true}', CHAT)
    outside = tmp_path / "outside.json"
    outside.write_bytes((tmp_path / "store" / f"{real}.json").read_bytes())
    linked, fifo, zero = new_id(), new_id(), new_id()
    target = outside.read_bytes().replace(real.encode(), linked.encode())
    outside.write_bytes(target)
    (tmp_path / "store" / f"{linked}.json").symlink_to(outside)
    os.mkfifo(tmp_path / "store" / f"{fifo}.json")
    (tmp_path / "store" / f"{zero}.json").symlink_to("/dev/zero")
    for rid in (linked, fifo, zero):
        async with asyncio.timeout(5):
            assert await store.response(rid) is None, rid
            assert await store.conversation(rid) is None, rid
            assert not await store.delete(rid), rid
    assert outside.read_bytes() == target
    assert await store.response(real) == b'{"ok": true}'
