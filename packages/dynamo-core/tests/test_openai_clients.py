"""Real clients against real processes: `python -m dynamo_core.frontend` and one mocker process
per parser family (each started with its `--dyn-tool-call-parser` / `--dyn-reasoning-parser`
and a `--reply-script` that makes it write that family's markup), driven by the `openai` SDK
(`chat.completions.create(tools=...)` whole and streamed, `chat.completions.parse` with a
pydantic model, `responses.create` / `responses.stream`, `models.retrieve`, `embeddings.create`
against an embedding mocker) and by langchain-openai (`bind_tools`, `with_structured_output`,
`OpenAIEmbeddings`). Everything offline: the tiny model in
examples/models, no hub, no tokenizer downloads."""

from __future__ import annotations

import base64
import json
import socket
import struct
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from _families import CITY, FAMILIES, TOOL_FAMILIES, WEATHER_TOOL, Family
from dynamo_core.testing.procs import run_python

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"
PLAIN = "tiny-plain"
EMBED = "tiny-embed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A frontend and its mockers: one per tool-call family, one without parsers, one that
    serves embeddings."""
    folder = tmp_path_factory.mktemp("graph")
    env = {
        "DYN_FILE_KV": str(folder / "kv"),
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_NAMESPACE": "t" + uuid.uuid4().hex[:10],
    }
    mocker = ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--speedup-ratio", "100"]
    port = free_port()
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                run_python([*mocker, "--model-name", PLAIN, "--component-name", "plain"], env=env)
            )
        ]
        embed = [*mocker, "--model-name", EMBED, "--component-name", "embed", "--embedding-worker"]
        procs.append(stack.enter_context(run_python(embed, env=env)))
        for name in TOOL_FAMILIES:
            family = FAMILIES[name]
            script = family.script(folder / f"{name}.json")
            args = [*mocker, "--model-name", f"tiny-{name}", "--component-name", name]
            args += ["--reply-script", str(script), *family.flags()]
            procs.append(stack.enter_context(run_python(args, env=env)))
        front = ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)]
        frontend = stack.enter_context(run_python(front, env=env))
        for proc in procs:
            proc.wait_for_line("/generate as instance", timeout=60)
        frontend.wait_for_line("OpenAI API on", timeout=60)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=5) as http:
            wait_for_models(http, len(procs))
        yield url


def wait_for_models(http: httpx.Client, count: int) -> None:
    import time

    deadline = time.monotonic() + 60
    while len(http.get("/v1/models").json()["data"]) < count:
        assert time.monotonic() < deadline, http.get("/v1/models").json()
        time.sleep(0.05)  # polling HTTP from outside: nothing to await on


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# -- every family's tool calls and reasoning ----------------------------------------------------


def check_call(family: Family, calls: list[tuple[str | None, str, str]]) -> None:
    """calls: (id, name, arguments) as the client assembled them."""
    assert [(name, json.loads(args)) for _, name, args in calls] == [("get_weather", CITY)]
    ids = [cid for cid, _, _ in calls]
    if family.call_ids:
        assert ids == family.call_ids
    else:
        assert all(cid and len(cid) >= 9 for cid in ids), ids


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_tool_calls_of_every_family_whole(client: openai.OpenAI, name: str) -> None:
    family = FAMILIES[name]
    r = client.chat.completions.create(
        model=f"tiny-{name}", messages=user("weather in Paris?"), tools=[WEATHER_TOOL]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert (message.content or "") == family.call_content
    assert (getattr(message, "reasoning_content", None) or "") == family.call_reasoning
    check_call(family, [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()])  # type: ignore[union-attr]  # fmt: skip

    # without tools: the answer, its reasoning split off when the family has a reasoning parser
    r = client.chat.completions.create(model=f"tiny-{name}", messages=user("hello"))
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == family.answer_content
    assert (
        getattr(r.choices[0].message, "reasoning_content", None) or ""
    ) == family.answer_reasoning


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_tool_calls_of_every_family_streamed(client: openai.OpenAI, name: str) -> None:
    family = FAMILIES[name]
    stream = client.chat.completions.create(
        model=f"tiny-{name}", messages=user("weather in Paris?"), tools=[WEATHER_TOOL], stream=True
    )
    content, reasoning, finish = "", "", None
    calls: dict[int, list[Any]] = {}
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or ():
            if call.id is not None:  # the first delta of a call: id, type, name
                assert call.index not in calls and call.type == "function"
                assert call.function is not None and call.function.arguments == ""
                calls[call.index] = [call.id, call.function.name, ""]
            else:
                assert call.function is not None and call.function.name is None
                calls[call.index][2] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert content == family.call_content and reasoning == family.call_reasoning
    check_call(family, [tuple(calls[i]) for i in sorted(calls)])  # type: ignore[misc]


# -- structured output, responses, models ---------------------------------------------------------


class Trip(pydantic.BaseModel):
    city: str
    days: int
    tags: list[str]


def test_chat_completions_parse_yields_the_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=PLAIN, messages=user("plan a trip"), response_format=Trip
    )
    trip = completion.choices[0].message.parsed
    assert isinstance(trip, Trip)
    assert Trip.model_validate_json(completion.choices[0].message.content or "") == trip


def test_responses_create_and_stream(client: openai.OpenAI) -> None:
    model = "tiny-hermes"
    r = client.responses.create(model=model, input="hello", instructions="Be nice.")
    assert r.status == "completed" and r.output_text == "It is sunny."
    assert [item.type for item in r.output] == ["reasoning", "message"]
    follow = client.responses.create(model=model, input="hello again", previous_response_id=r.id)
    assert follow.previous_response_id == r.id and follow.output_text == "It is sunny."

    weather = {"type": "function", **WEATHER_TOOL["function"]}  # type: ignore[dict-item]
    with client.responses.stream(model=model, input="weather in Paris?", tools=[weather]) as s:
        types = [event.type for event in s]
        final = s.get_final_response()
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in types
    call = final.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == CITY


def test_models_retrieve(client: openai.OpenAI) -> None:
    listed = sorted(m.id for m in client.models.list())
    assert listed == sorted([PLAIN, EMBED, *(f"tiny-{n}" for n in TOOL_FAMILIES)])
    assert client.models.retrieve("tiny-glm45").id == "tiny-glm45"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny-nope")


# -- the prompt's log-probabilities ------------------------------------------------------------


def mocker_prompt_logprobs(tokens: list[int]) -> list[float | None]:
    """What a mocker says of a prompt's tokens (the same in every process: computed here)."""
    from dynamo_core.mocker.engine import MockerEngine

    return MockerEngine(vocab_size=300).prompt_logprobs(tokens, 0)[0]


def test_completions_echo_with_logprobs_over_the_mocker(client: openai.OpenAI) -> None:
    """The prompt's tokens lead the logprobs, whole and streamed (what evaluation harnesses
    read), with vLLM's `prompt_logprobs` beside them in the whole response."""
    prompt = "The capital of France is"
    tokens = tiny_tokens(prompt)
    values = mocker_prompt_logprobs(tokens)
    body: dict[str, Any] = {"model": PLAIN, "prompt": prompt, "echo": True, "logprobs": 2}
    whole = client.completions.create(**body, max_tokens=4, seed=7)
    choice = whole.choices[0]
    assert choice.text.startswith(prompt)
    assert choice.logprobs is not None
    lp = choice.logprobs
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[: len(tokens)] == values
    assert len(lp.token_logprobs) == len(tokens) + whole.usage.completion_tokens  # type: ignore[union-attr]
    assert lp.top_logprobs[0] is None
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]  # type: ignore[index, arg-type]
    extra = choice.model_extra or {}
    assert [None if e is None else e[str(t)]["logprob"] for e, t in zip(extra["prompt_logprobs"], tokens, strict=True)] == values  # fmt: skip
    assert whole.usage is not None and whole.usage.prompt_tokens == len(tokens)

    chunks = list(client.completions.create(**body, max_tokens=4, seed=7, stream=True))
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs or ()]  # fmt: skip
    assert streamed == lp.token_logprobs
    assert "".join(c.choices[0].text for c in chunks) == choice.text

    # scoring: no output tokens, the prompt's logprobs only
    scored = client.completions.create(**body, max_tokens=0)
    assert scored.choices[0].text == prompt
    assert scored.choices[0].logprobs is not None
    assert scored.choices[0].logprobs.token_logprobs == values
    assert scored.usage is not None and scored.usage.completion_tokens == 0


def test_chat_prompt_logprobs_over_the_mocker(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=PLAIN, messages=user("hello"), max_tokens=3, extra_body={"prompt_logprobs": 1}
    )
    shown = (r.model_extra or {})["prompt_logprobs"]
    assert r.usage is not None and len(shown) == r.usage.prompt_tokens
    assert shown[0] is None and all(len(entry) == 1 for entry in shown[1:])  # rank 1: itself
    assert all(next(iter(e.values()))["rank"] == 1 for e in shown[1:])
    with pytest.raises(openai.BadRequestError, match="not available when `stream=True`"):
        client.chat.completions.create(
            model=PLAIN, messages=user("hello"), stream=True, extra_body={"prompt_logprobs": 1}
        )


# -- embeddings -------------------------------------------------------------------------------


def unit_vector(tokens: list[int], size: int = 64) -> list[float]:
    """What the embedding mocker answers for `tokens` (its vectors are the same in every
    process: computed here, in the test's own)."""
    from dynamo_core.mocker.embedding import mock_embedding

    return mock_embedding(tokens, size)


def tiny_tokens(text: str) -> list[int]:
    from dynamo_core.llm import Tokenizer

    return Tokenizer.from_dir(TINY).encode(text, add_special_tokens=True)


def assert_vectors(got: list[Any], want: list[list[float]]) -> None:
    for v, w in zip(got, want, strict=True):
        assert list(v) == pytest.approx(w, rel=1e-6, abs=1e-7)


def test_embeddings_create(client: openai.OpenAI) -> None:
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    want = [unit_vector(tiny_tokens(t)) for t in texts]
    tokens = sum(len(tiny_tokens(t)) for t in texts)
    for encoding in ("float", "base64", openai.NOT_GIVEN):
        r = client.embeddings.create(model=EMBED, input=texts, encoding_format=encoding)
        assert r.model == EMBED and [d.index for d in r.data] == [0, 1]
        got: list[Any] = [d.embedding for d in r.data]
        if encoding == "base64":  # asked for: the SDK hands the text over as it came
            got = [struct.unpack("<64f", base64.b64decode(v)) for v in got]
        # not given: the SDK asks for base64 and decodes it itself
        assert_vectors(got, want)
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    one = client.embeddings.create(model=EMBED, input=texts[0])
    assert_vectors([one.data[0].embedding], want[:1])

    ids = tiny_tokens(texts[1])
    r = client.embeddings.create(model=EMBED, input=ids)
    assert_vectors([r.data[0].embedding], want[1:])
    r = client.embeddings.create(model=EMBED, input=[ids, [7, 8, 9]], encoding_format="float")
    assert_vectors([d.embedding for d in r.data], [want[1], unit_vector([7, 8, 9])])
    assert r.usage.prompt_tokens == len(ids) + 3

    short = client.embeddings.create(model=EMBED, input=texts[0], dimensions=16)
    assert len(short.data[0].embedding) == 16


def test_embedding_and_chat_models_refuse_each_others_routes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=EMBED, messages=user("hello"))
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        client.embeddings.create(model=PLAIN, input="hello")
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=EMBED, input="")
    assert isinstance(empty.value.body, dict) and empty.value.body["param"] == "input"


# -- langchain-openai ---------------------------------------------------------------------------


def chat_model(base_url: str, model: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=model,
        base_url=base_url + "/v1",
        api_key="unused",
        max_retries=0,
        **kwargs,  # type: ignore[arg-type]
    )


def test_langchain_bind_tools(base_url: str) -> None:
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    llm = chat_model(base_url, "tiny-hermes").bind_tools([get_weather])
    message = llm.invoke("weather in Paris?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", CITY)]

    chunks = list(llm.stream("weather in Paris?"))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_weather", CITY)]
    assert whole.response_metadata.get("finish_reason") == "tool_calls"


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(base_url: str, method: str) -> None:
    llm = chat_model(base_url, PLAIN).with_structured_output(Trip, method=method)
    if method == "json_mode":  # the schema is only in the prompt: any JSON object comes back
        llm = chat_model(base_url, PLAIN).with_structured_output(None, method=method)
        assert isinstance(llm.invoke("plan a trip, as JSON"), dict)
        return
    assert isinstance(llm.invoke("plan a trip"), Trip)


def test_langchain_embeddings(base_url: str) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=EMBED,
        base_url=base_url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        max_retries=0,
        check_embedding_ctx_length=False,  # else it tokenizes with tiktoken (a download)
    )
    texts = ["a document", "another one"]
    assert_vectors(embeddings.embed_documents(texts), [unit_vector(tiny_tokens(t)) for t in texts])
    assert_vectors([embeddings.embed_query("a query")], [unit_vector(tiny_tokens("a query"))])
