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


def prompt_alternatives(token: int, n: int) -> list[tuple[int, float]]:
    """The `n` most likely at a prompt token's place: a more likely one first, then the token
    itself (rank 2), then others."""
    more = OTHERS[-1]
    return [(more, logprob(token) + 0.5), *alternatives(token, n)][:n]


class ScriptHandler(BaseWorkerHandler):
    """Replays `script` (token groups, one engine output each), with log-probabilities when
    asked (the prompt's on the first output); `finish` ends the last output."""

    supports_prompt_logprobs = True

    def __init__(self) -> None:
        super().__init__(name="script")
        self.script: list[list[int]] = []
        self.finish = "length"
        self.logprob = logprob
        self.prompts: list[int | None] = []
        """`prompt_logprobs` of each request received."""

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        want = request.output_options.logprobs
        prompt_n = request.output_options.prompt_logprobs
        self.prompts.append(prompt_n)
        for i, group in enumerate(self.script):
            out = EngineOutput(token_ids=list(group))
            if want is not None:
                out.log_probs = [self.logprob(t) for t in group]
                out.top_logprobs = [alternatives(t) if want else [] for t in group]
            if i == 0 and prompt_n is not None:
                rest = request.token_ids[1:]
                out.prompt_log_probs = [None, *(self.logprob(t) for t in rest)]
                out.prompt_top_logprobs = [[], *(prompt_alternatives(t, prompt_n) for t in rest)]
                out.prompt_ranks = [None, *(2 for _ in rest)]
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
    # with echo, the prompt's tokens come first: offsets count their strings from 0
    whole, chunks = await complete(client, logprobs=0, echo=True, prompt="Say: ")
    assert whole.choices[0].text == "Say: naïve 中文 text"
    echoed = whole.choices[0].logprobs
    prompt = TOK.encode("Say: ", add_special_tokens=True)
    assert echoed.tokens[len(prompt) :] == lp.tokens
    shift = len("".join(echoed.tokens[: len(prompt)]))
    assert echoed.text_offset == [
        len("".join(echoed.tokens[:i])) for i in range(len(echoed.tokens))
    ]
    assert echoed.text_offset[len(prompt) :] == [o + shift for o in lp.text_offset]
    streamed = [
        o
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset
    ]
    assert streamed == echoed.text_offset


# -- 4b. the prompt's log-probabilities -----------------------------------------------------------


def streamed_logprobs(chunks: list[Any], index: int = 0) -> dict[str, list[Any]]:
    lists: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for c in chunks:
        for choice in c.choices:
            if choice.index == index and choice.logprobs:
                for key, values in lists.items():
                    values.extend(getattr(choice.logprobs, key))
    return lists


async def test_echo_with_logprobs_leads_with_the_prompt_tokens(api: Any) -> None:
    """vLLM's echo: the prompt's tokens first (the first with null log-probability and
    alternatives), then the generated ones; text, usage and streaming agree."""
    client, handler = api
    generated = TOK.encode(" one two")
    handler.script = [generated[:1], generated[1:]]
    prompt = TOK.encode("Say: ", add_special_tokens=True)
    whole, chunks = await complete(client, logprobs=1, echo=True, prompt="Say: ")
    choice = whole.choices[0]
    assert choice.text == "Say:  one two" == streamed_text(chunks)
    lp = choice.logprobs
    assert lp.tokens == [TOK.decode(prompt[:1], skip_special_tokens=False)] + [
        TOK.token_string(t) for t in [*prompt[1:], *generated]
    ]
    assert lp.token_logprobs == [None, *(logprob(t) for t in [*prompt[1:], *generated])]
    # a prompt token: itself first, then the most likely other (the more likely one here)
    assert lp.top_logprobs[0] is None
    assert lp.top_logprobs[1] == {
        TOK.token_string(prompt[1]): logprob(prompt[1]),
        TOK.token_string(OTHERS[-1]): logprob(prompt[1]) + 0.5,
    }
    assert lp.top_logprobs[len(prompt)] == {
        TOK.token_string(t): v for t, v in alternatives(generated[0])[:2]
    }
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert streamed_logprobs(chunks) == {
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "top_logprobs": lp.top_logprobs,
        "text_offset": lp.text_offset,
    }
    # the echo comes first, with the prompt's logprobs; usage is what it was
    assert chunks[0].choices[0].text == "Say: "
    assert chunks[0].choices[0].logprobs.tokens == lp.tokens[: len(prompt)]
    assert whole.usage.prompt_tokens == len(prompt) == chunks[-1].usage.prompt_tokens
    assert whole.usage.completion_tokens == len(generated) == chunks[-1].usage.completion_tokens
    # the engine was asked for the prompt's logprobs as many as `logprobs` (vLLM's rule)
    assert handler.prompts == [1, 1]
    # vLLM's `prompt_logprobs` ride along in the whole response
    assert len(choice.model_extra["prompt_logprobs"]) == len(prompt)


async def test_echo_with_logprobs_and_no_output_tokens_scores_the_prompt(api: Any) -> None:
    """`max_tokens` 0 (how evaluation harnesses score a text): the prompt's logprobs only."""
    client, handler = api
    handler.script = [TOK.encode(" one")]
    prompt = TOK.encode("Say: ", add_special_tokens=True)
    whole, chunks = await complete(client, logprobs=0, echo=True, prompt="Say: ", max_tokens=0)
    lp = whole.choices[0].logprobs
    assert whole.choices[0].text == "Say: " == streamed_text(chunks)
    assert lp.token_logprobs == [None, *(logprob(t) for t in prompt[1:])]
    assert lp.top_logprobs == [None, *({TOK.token_string(t): logprob(t)} for t in prompt[1:])]
    assert streamed_logprobs(chunks)["token_logprobs"] == lp.token_logprobs
    assert whole.usage.completion_tokens == 0 == chunks[-1].usage.completion_tokens
    assert whole.choices[0].finish_reason == "length"


async def test_echo_without_logprobs_asks_for_nothing(api: Any) -> None:
    client, handler = api
    handler.script = [TOK.encode(" one")]
    whole, chunks = await complete(client, echo=True, prompt="Say: ")
    assert whole.choices[0].logprobs is None
    assert "prompt_logprobs" not in (whole.choices[0].model_extra or {})
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    assert handler.prompts == [None, None]


async def test_each_choice_carries_the_prompt_logprobs(api: Any) -> None:
    client, handler = api
    handler.script = [TOK.encode(" one")]
    whole, chunks = await complete(client, logprobs=0, echo=True, prompt="Say: ", n=2, seed=3)
    first, second = whole.choices
    assert first.logprobs == second.logprobs
    assert first.model_extra["prompt_logprobs"] == second.model_extra["prompt_logprobs"]
    assert streamed_logprobs(chunks, 0) == streamed_logprobs(chunks, 1)
    assert streamed_logprobs(chunks, 1)["tokens"] == first.logprobs.tokens


async def test_vllm_prompt_logprobs_shape(api: Any) -> None:
    """vLLM's `prompt_logprobs`: null, then per token a map of token id to logprob, rank and
    decoded token: the prompt token first (its own rank), then the most likely ones ranked;
    in each completions choice, at the top of a chat completion; never in a stream."""
    client, handler = api
    handler.script = [TOK.encode(" one")]
    prompt = TOK.encode("Say: ", add_special_tokens=True)
    whole = await client.completions.create(
        model="tiny", prompt="Say: ", max_tokens=2, extra_body={"prompt_logprobs": 2}
    )
    choice = whole.choices[0]
    assert choice.logprobs is None  # `logprobs` was not asked for
    shown = choice.model_extra["prompt_logprobs"]
    assert shown[0] is None
    for token, entry in zip(prompt[1:], shown[1:], strict=True):
        more, chosen = OTHERS[-1], token
        assert list(entry) == [str(chosen), str(more)]  # the prompt token first
        assert entry[str(chosen)] == {
            "logprob": logprob(token),
            "rank": 2,
            "decoded_token": TOK.token_string(token),
        }
        assert entry[str(more)]["rank"] == 1
    assert handler.prompts[-1] == 2

    reply = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say"}],
        max_tokens=2,
        extra_body={"prompt_logprobs": 0},
    )
    chat_prompt = reply.model_extra["prompt_logprobs"]
    assert chat_prompt[0] is None and len(chat_prompt) == reply.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in chat_prompt[1:])  # 0: the prompt token alone
    # 0 is allowed in a stream (vLLM's rule), and shows nothing there
    stream = await client.completions.create(
        model="tiny", prompt="Say", max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}
    )
    chunks = [c async for c in stream]
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    assert all(
        "prompt_logprobs" not in (c.choices[0].model_extra or {}) for c in chunks if c.choices
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prompt_logprobs": 1, "stream": True}, "not available when `stream=True`"),
        ({"prompt_logprobs": -1, "stream": True}, "not available when `stream=True`"),
        ({"prompt_logprobs": -2}, "must be a positive value or -1"),
        ({"prompt_logprobs": -1}, "greater than max allowed: 20"),
        ({"prompt_logprobs": 21}, "Requested prompt logprobs of 21"),
        ({"prompt_logprobs": "2"}, "Expected `int | null`"),
    ],
)
async def test_prompt_logprobs_are_checked_as_vllm_checks_them(
    api: Any, extra: dict[str, Any], message: str
) -> None:
    client, handler = api
    handler.script = [TOK.encode(" one")]
    for kind in ("completions", "chat"):
        with pytest.raises(openai.BadRequestError) as info:
            if kind == "completions":
                await client.completions.create(model="tiny", prompt="Say", extra_body=extra)
            else:
                await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Say"}], extra_body=extra
                )
        assert message in info.value.message
        assert info.value.body["param"] == "prompt_logprobs"  # type: ignore[index]
    assert handler.prompts == []  # nothing reached the worker


async def test_a_worker_without_prompt_logprobs_is_a_clear_error(api: Any) -> None:
    """A worker whose engine cannot return them refuses: the client gets a 400 saying so."""
    client, handler = api
    handler.script = [TOK.encode(" one")]
    handler.supports_prompt_logprobs = False  # type: ignore[misc]
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="tiny", prompt="Say", logprobs=1, echo=True)
    assert "log-probabilities" in info.value.message


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
