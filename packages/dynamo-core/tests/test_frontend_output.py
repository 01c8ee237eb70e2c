"""The frontend's output path against vLLM's rules: held-back bytes at the end, stop strings
inside multi-token engine outputs, `top_logprobs`, `text_offset`, the token strings and bytes of
log-probabilities. One process (mem discovery, inproc requests), the real `openai` client, and an
engine that replays a script of outputs: several tokens per output, as engines batch under load.
The same rules against the real vLLM: packages/dynamo-vllm/tests/test_vllm_exact.py."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from dynamo_core.frontend.service import OpenAIService
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.http import serve_http
from dynamo_core.llm import register_model
from dynamo_core.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"
TOK = Tokenizer.from_dir(TINY)
FFFD = "\ufffd"


def byte_ids(text: str) -> list[int]:
    """One token per UTF-8 byte (the byte-level alphabet is in every byte-level vocabulary)."""
    by_bytes = {TOK.token_bytes(i): i for i in range(TOK.vocab_size) if i not in TOK._added_ids}
    return [by_bytes[bytes([b])] for b in text.encode()]


def logprob(token: int) -> float:
    return -((token % 7) + 1) / 8


#: Whole-word tokens offered as the less likely alternatives.
OTHERS = TOK.encode(" cat dog")


def alternatives(token: int, n: int = 3) -> list[tuple[int, float]]:
    """The chosen token first (the most likely), then others, each less likely."""
    return [(token, logprob(token))] + [(OTHERS[k - 1], logprob(token) - k) for k in range(1, n)]


class ScriptHandler(BaseWorkerHandler):
    """Replays `script` (token groups, one engine output each), with log-probabilities when
    asked; `finish` ends the last output."""

    def __init__(self) -> None:
        super().__init__(name="script")
        self.script: list[list[int]] = []
        self.finish = "length"
        self.logprob = logprob

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        want = request.output_options.logprobs
        for i, group in enumerate(self.script):
            out = EngineOutput(token_ids=list(group))
            if want is not None:
                out.log_probs = [self.logprob(t) for t in group]
                out.top_logprobs = [alternatives(t) if want else [] for t in group]
            if i == len(self.script) - 1:
                out.finish_reason = self.finish  # type: ignore[assignment]
            yield out

    async def abort(self, request_id: str) -> None:
        pass


@pytest.fixture
async def api(namespace: str) -> AsyncIterator[tuple[openai.AsyncOpenAI, ScriptHandler]]:
    async with DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as rt:
        handler = ScriptHandler()
        ep = rt.namespace().component("backend").endpoint("generate")
        await register_model(ep, model_path=TINY, model_name="tiny")
        await ep.start_serving(handler.generate)
        service = OpenAIService(rt, namespace=namespace)
        await service.start()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.port}/v1"
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        try:
            yield client, handler
        finally:
            await client.close()
            await server.close()
            await service.close()


async def complete(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[Any, list[Any]]:
    """The whole response and the streamed chunks of the same request."""
    args = {"model": "tiny", "prompt": "Say", "max_tokens": 50, **kwargs}
    whole = await client.completions.create(**args)
    stream = await client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    return whole, [c async for c in stream]


async def chat(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[Any, list[Any]]:
    args = {"model": "tiny", "messages": [{"role": "user", "content": "Say"}], **kwargs}
    whole = await client.chat.completions.create(max_tokens=50, **args)
    stream = await client.chat.completions.create(
        max_tokens=50, **args, stream=True, stream_options={"include_usage": True}
    )
    return whole, [c async for c in stream]


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


# -- 1. what is still held back at the end -----------------------------------------------------


async def test_unfinished_character_at_the_end_is_dropped(api: Any) -> None:
    client, handler = api
    handler.script = [TOK.encode("ok "), byte_ids("中")[:2]]
    whole, chunks = await complete(client)
    assert whole.choices[0].text == "ok " == streamed_text(chunks)
    assert whole.usage.completion_tokens == len(TOK.encode("ok ")) + 2


async def test_whole_character_sharing_a_token_with_a_cut_one_is_dropped(api: Any) -> None:
    """vLLM drops what it holds back, the space in a token " \\xf0\\x9f" included."""
    client, handler = api
    token = next(i for i in range(TOK.vocab_size) if TOK.token_bytes(i) == b" \xf0\x9f")
    handler.script = [TOK.encode("Hi"), [token]]
    whole, chunks = await complete(client)
    assert whole.choices[0].text == "Hi" == streamed_text(chunks)


# -- 2. stop strings inside an output of several tokens ---------------------------------------


async def test_tokens_after_a_stop_string_are_not_counted(api: Any) -> None:
    client, handler = api
    tokens = TOK.encode("one two three four five six")
    # where "three" completes: the first token whose text reaches the end of it
    text_ends = [len(TOK.decode(tokens[: i + 1])) for i in range(len(tokens))]
    completing = next(i for i, end in enumerate(text_ends) if end >= len("one two three"))
    handler.script = [tokens[:2], tokens[2:]]  # the stop string lies in a 4-token output
    whole, chunks = await complete(client, stop=["three"], logprobs=1)
    assert whole.choices[0].text == "one two " == streamed_text(chunks)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == completing + 1 == chunks[-1].usage.completion_tokens
    shown = whole.choices[0].logprobs.tokens
    assert "".join(shown) == "one two three"
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == shown


async def test_stop_strings_wait_for_min_tokens(api: Any) -> None:
    """vLLM's rule: a stop string may not end within the first `min_tokens` tokens."""
    client, handler = api
    tokens = TOK.encode("a b a b a b")
    handler.script = [tokens]
    first_b = next(i for i in range(len(tokens)) if "b" in TOK.decode(tokens[: i + 1]))
    whole, _ = await complete(client, stop=["b"], extra_body={"min_tokens": first_b + 1})
    assert whole.choices[0].text == "a b a "
    assert whole.usage.completion_tokens == first_b + 3  # " a", " b"


async def test_stop_string_completed_by_a_cut_character(api: Any) -> None:
    """The token that completes a stop string is the one that completes its last character."""
    client, handler = api
    tokens = [*TOK.encode("x"), *byte_ids("中"), *TOK.encode("yz")]
    handler.script = [tokens]
    whole, chunks = await complete(client, stop=["中"])
    assert whole.choices[0].text == "x" == streamed_text(chunks)
    assert whole.usage.completion_tokens == 4


# -- 3. top_logprobs -------------------------------------------------------------------------


async def test_chat_top_logprobs(api: Any) -> None:
    client, handler = api
    tokens = TOK.encode("one two")
    handler.script = [tokens]
    for top in (0, 2):
        whole, chunks = await chat(client, logprobs=True, top_logprobs=top)
        content = whole.choices[0].logprobs.content
        assert [len(c.top_logprobs) for c in content] == [top] * len(tokens)
        assert [c.logprob for c in content] == [logprob(t) for t in tokens]
        streamed = [
            e
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content
        ]
        assert streamed == content
    whole, _ = await chat(client, logprobs=True)  # top_logprobs absent: 0
    assert all(c.top_logprobs == [] for c in whole.choices[0].logprobs.content)


async def test_completion_top_logprobs_hold_the_chosen_token_then_the_top(api: Any) -> None:
    client, handler = api
    tokens = TOK.encode("one two")
    handler.script = [tokens]
    for n in (0, 1, 2):
        whole, _ = await complete(client, logprobs=n)
        lp = whole.choices[0].logprobs
        expected = [{TOK.token_string(t): v for t, v in alternatives(t)[: n + 1]} for t in tokens]
        assert lp.top_logprobs == expected
        assert next(iter(lp.top_logprobs[0])) == lp.tokens[0]


async def test_minus_infinity_is_sent_as_minus_9999(api: Any) -> None:
    client, handler = api
    handler.script = [TOK.encode("one")]
    handler.logprob = lambda token: -math.inf
    whole, _ = await complete(client, logprobs=0)
    assert whole.choices[0].logprobs.token_logprobs == [-9999.0] * len(TOK.encode("one"))


# -- 4. text_offset ------------------------------------------------------------------------------


async def test_text_offsets_are_character_offsets(api: Any) -> None:
    client, handler = api
    tokens = TOK.encode("naïve 中文 text")
    handler.script = [tokens[:3], tokens[3:]]
    whole, chunks = await complete(client, logprobs=0)
    lp = whole.choices[0].logprobs
    text = whole.choices[0].text
    assert text == "naïve 中文 text"
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(tokens))]
    assert [
        text[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)
    ] == lp.tokens
    streamed = [
        o
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset
    ]
    assert streamed == lp.text_offset
    # with echo, the prompt comes first in the text: offsets count it
    whole, chunks = await complete(client, logprobs=0, echo=True, prompt="Say: ")
    assert whole.choices[0].text == "Say: naïve 中文 text"
    assert whole.choices[0].logprobs.text_offset == [o + len("Say: ") for o in lp.text_offset]
    streamed = [
        o
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset
    ]
    assert streamed == whole.choices[0].logprobs.text_offset


# -- 5. token strings and bytes of cut characters ---------------------------------------------


async def test_cut_characters_show_vllm_strings_and_their_real_bytes(api: Any) -> None:
    client, handler = api
    tokens = [*TOK.encode("a"), *byte_ids("中🙂")]
    handler.script = [tokens]
    whole, chunks = await chat(client, logprobs=True, top_logprobs=1)
    content = whole.choices[0].logprobs.content
    # vLLM's strings: a cut character shows on the token that completes it, "" before
    assert [c.token for c in content] == ["a", "", "", "中", "", "", "", "🙂"]
    # the bytes are each token's own: joined, they give the text
    assert [bytes(c.bytes) for c in content] == [b"a", *(bytes([b]) for b in "中🙂".encode())]
    assert b"".join(bytes(c.bytes) for c in content).decode() == whole.choices[0].message.content
    # the alternatives (the chosen token first here) follow the same rules
    assert [c.top_logprobs[0].token for c in content] == [c.token for c in content]
    assert [c.top_logprobs[0].bytes for c in content] == [c.bytes for c in content]
    assert not any(FFFD in c.token for c in content)
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed == content
