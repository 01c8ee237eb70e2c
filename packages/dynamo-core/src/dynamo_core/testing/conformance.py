"""The conformance kit: what every engine's worker handler must do, as pytest tests.

An engine package gets the whole suite by subclassing and supplying its handler built on a fake
of its engine (written against the engine's real Python API):

    from dynamo_core.testing.conformance import HandlerConformance

    class TestVllmHandler(HandlerConformance):
        supports_logprobs = True

        @pytest.fixture
        def handler(self):
            return WorkerHandler(FakeAsyncLLM(...))

        def active_requests(self, handler):
            return len(handler.engine.requests)

        def break_engine(self, handler):
            handler.engine.fail_next = RuntimeError("CUDA error: out of memory")

Capability flags switch groups on or off: `supports_logprobs`, `supports_prompt_logprobs`
(without it, a request for them must be refused, never answered without them),
`supports_disaggregation`
(then also `prefill_handler` and `decode_handler` fixtures), `supports_guided_decoding` (every
kind of `GuidedDecoding` constraint is served; what the engine receives is the package's own
test), `deterministic` (same prompt, same seed, same tokens: needed for the stop-token test).
A malformed constraint is refused by every handler, whatever its flags.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import msgspec
import pytest

from dynamo_core.errors import DynamoError, EngineError, InvalidRequestError
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_core.runtime import Context

__all__ = ["HandlerConformance", "collect", "make_request"]


def make_request(
    token_ids: list[int],
    *,
    max_tokens: int | None = 8,
    ignore_eos: bool = True,
    stop_token_ids: list[int] | None = None,
    eos_token_ids: list[int] | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    seed: int = 1234,
    **extra: Any,
) -> dict[str, Any]:
    """A `PreprocessedRequest` map as a frontend would send it (`max_tokens=None`: without)."""
    stop: dict[str, Any] = {"ignore_eos": ignore_eos}
    if max_tokens is not None:
        stop["max_tokens"] = max_tokens
    req: dict[str, Any] = {
        "token_ids": token_ids,
        "model": "test",
        "stop_conditions": stop,
        "sampling_options": {"temperature": 0.0, "seed": seed},
        "output_options": {},
        "eos_token_ids": eos_token_ids or [],
    }
    if stop_token_ids is not None:
        req["stop_conditions"]["stop_token_ids"] = stop_token_ids
    if logprobs is not None:
        req["output_options"]["logprobs"] = logprobs
    if prompt_logprobs is not None:
        req["output_options"]["prompt_logprobs"] = prompt_logprobs
    req.update(extra)
    return req


async def collect(
    handler: BaseWorkerHandler, request: Any, context: Context | None = None
) -> list[dict[str, Any]]:
    """Every output of `request` (a map, or a `PreprocessedRequest` as the `inproc` plane
    hands it over)."""
    return [out async for out in handler.generate(request, context or Context())]


def tokens_of(outputs: list[dict[str, Any]]) -> list[int]:
    return [t for out in outputs for t in out.get("token_ids", [])]


class HandlerConformance:
    """Base class of an engine handler's conformance tests (not collected by itself)."""

    supports_logprobs: ClassVar[bool] = False
    supports_prompt_logprobs: ClassVar[bool] = False
    supports_disaggregation: ClassVar[bool] = False
    supports_guided_decoding: ClassVar[bool] = False
    deterministic: ClassVar[bool] = True
    prompt: ClassVar[list[int]] = list(range(10, 42))

    # -- what a subclass supplies ---------------------------------------------------------

    @pytest.fixture
    def handler(self) -> BaseWorkerHandler:
        raise NotImplementedError("supply a `handler` fixture")

    def active_requests(self, handler: BaseWorkerHandler) -> int:
        """How many requests the (fake) engine is still working on."""
        raise NotImplementedError

    def break_engine(self, handler: BaseWorkerHandler) -> None:
        """Make the engine's next generate call fail with an engine exception."""
        raise NotImplementedError

    # -- streaming, limits, usage ---------------------------------------------------------

    async def test_streams_new_tokens_with_finish_reason_and_usage(
        self, handler: BaseWorkerHandler
    ) -> None:
        outs = await collect(handler, make_request(self.prompt, max_tokens=12))
        assert outs, "no output"
        assert all(out.get("finish_reason") is None for out in outs[:-1])
        last = outs[-1]
        assert last["finish_reason"] == "length"
        assert len(tokens_of(outs)) == 12
        assert last["usage"]["prompt_tokens"] == len(self.prompt)
        assert last["usage"]["completion_tokens"] == 12
        assert self.active_requests(handler) == 0

    @pytest.mark.parametrize("max_tokens", [1, 5, 33])
    async def test_honours_max_tokens(self, handler: BaseWorkerHandler, max_tokens: int) -> None:
        outs = await collect(handler, make_request(self.prompt, max_tokens=max_tokens))
        assert len(tokens_of(outs)) == max_tokens
        assert outs[-1]["finish_reason"] == "length"
        assert outs[-1]["usage"]["completion_tokens"] == max_tokens

    async def test_max_tokens_zero_never_reaches_the_engine(
        self, handler: BaseWorkerHandler, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[PreprocessedRequest] = []
        engine_generate = handler.engine_generate

        def spy(request: PreprocessedRequest, context: Context) -> AsyncIterator[EngineOutput]:
            calls.append(request)
            return engine_generate(request, context)

        monkeypatch.setattr(handler, "engine_generate", spy)
        outs = await collect(handler, make_request(self.prompt, max_tokens=0))
        assert calls == []
        assert [o.get("token_ids", []) for o in outs] == [[]]
        assert outs[0]["finish_reason"] == "length"
        assert outs[0]["usage"].get("completion_tokens", 0) == 0  # omitted when 0
        assert outs[0]["usage"]["prompt_tokens"] == len(self.prompt)
        assert self.active_requests(handler) == 0
        await collect(handler, make_request(self.prompt, max_tokens=1))
        assert len(calls) == 1  # the spy sees a real request

    async def test_missing_max_tokens_uses_the_context(
        self, handler: BaseWorkerHandler, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(handler, "context_length", len(self.prompt) + 5)
        outs = await collect(handler, make_request(self.prompt, max_tokens=None))
        assert len(tokens_of(outs)) == 5
        assert outs[-1]["finish_reason"] == "length"
        assert self.active_requests(handler) == 0

    async def test_the_request_is_not_changed(self, handler: BaseWorkerHandler) -> None:
        """With the `inproc` request plane a handler gets the caller's own object: what it
        adds (request id, token budget) must not show there."""
        handler.context_length = len(self.prompt) + 4
        req = PreprocessedRequest.from_wire(make_request(self.prompt, max_tokens=None))
        before = msgspec.msgpack.encode(req)
        outs = await collect(handler, req)
        assert len(tokens_of(outs)) == 4
        assert msgspec.msgpack.encode(req) == before

    async def test_honours_stop_token_ids(self, handler: BaseWorkerHandler) -> None:
        if not self.deterministic:
            pytest.skip("engine is not deterministic")
        full = tokens_of(await collect(handler, make_request(self.prompt, max_tokens=16)))
        stop_at = next((i for i in range(2, len(full)) if full[i] not in full[:i]), None)
        assert stop_at is not None, f"no usable stop token in {full}"
        outs = await collect(
            handler, make_request(self.prompt, max_tokens=16, stop_token_ids=[full[stop_at]])
        )
        assert tokens_of(outs) == full[:stop_at]
        assert outs[-1]["finish_reason"] == "stop"
        assert outs[-1]["usage"]["completion_tokens"] == stop_at
        assert self.active_requests(handler) == 0

    async def test_eos_ends_the_sequence_unless_ignored(self, handler: BaseWorkerHandler) -> None:
        if not self.deterministic:
            pytest.skip("engine is not deterministic")
        full = tokens_of(await collect(handler, make_request(self.prompt, max_tokens=16)))
        eos_at = next((i for i in range(1, len(full)) if full[i] not in full[:i]), None)
        assert eos_at is not None
        req = make_request(
            self.prompt, max_tokens=16, ignore_eos=False, eos_token_ids=[full[eos_at]]
        )
        outs = await collect(handler, req)
        assert tokens_of(outs) == full[: eos_at + 1]
        assert outs[-1]["finish_reason"] in ("eos", "stop")
        ignored = await collect(
            handler, {**req, "stop_conditions": {"max_tokens": 16, "ignore_eos": True}}
        )
        assert tokens_of(ignored) == full

    async def test_concurrent_requests_are_independent(self, handler: BaseWorkerHandler) -> None:
        results = await asyncio.gather(
            *(collect(handler, make_request(self.prompt, max_tokens=6 + i)) for i in range(4))
        )
        assert [len(tokens_of(r)) for r in results] == [6, 7, 8, 9]
        assert self.active_requests(handler) == 0

    # -- cancellation ---------------------------------------------------------------------

    async def test_cancellation_aborts_the_engine_request(self, handler: BaseWorkerHandler) -> None:
        ctx = Context()
        gen = handler.generate(make_request(self.prompt, max_tokens=100_000), ctx)
        first = await gen.__anext__()
        assert first.get("token_ids")
        assert self.active_requests(handler) == 1
        ctx.stop_generating()
        await gen.aclose()
        for _ in range(100):  # engines may free on their next step
            if self.active_requests(handler) == 0:
                break
            await asyncio.sleep(0.01)
        assert self.active_requests(handler) == 0
        assert handler.metrics.cancelled_total == 1

    async def test_cancelled_task_aborts_the_engine_request(
        self, handler: BaseWorkerHandler
    ) -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in handler.generate(
                make_request(self.prompt, max_tokens=100_000), Context()
            ):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if self.active_requests(handler) == 0:
                break
            await asyncio.sleep(0.01)
        assert self.active_requests(handler) == 0

    # -- errors ---------------------------------------------------------------------------

    async def test_engine_errors_are_mapped(self, handler: BaseWorkerHandler) -> None:
        self.break_engine(handler)
        with pytest.raises(DynamoError) as info:
            await collect(handler, make_request(self.prompt))
        assert isinstance(info.value, EngineError | InvalidRequestError)
        assert str(info.value)
        # the handler keeps serving
        outs = await collect(handler, make_request(self.prompt, max_tokens=3))
        assert len(tokens_of(outs)) == 3

    @pytest.mark.parametrize(
        "bad",
        [
            {"token_ids": []},
            {"token_ids": "not a list"},
            {"no_tokens": True},
            {"token_ids": [1, 2], "stop_conditions": {"max_tokens": -1}},
            {"token_ids": [1, 2], "guided_decoding": {}},
            {"token_ids": [1, 2], "guided_decoding": {"regex": "a+", "choice": ["a"]}},
            {"token_ids": [1, 2], "guided_decoding": {"choice": []}},
            {"token_ids": [1, 2], "guided_decoding": {"structural_tag": "<x>"}},
            {"token_ids": [1, 2], "guided_decoding": {"json": "not a schema map"}},
        ],
    )
    async def test_invalid_requests_are_rejected(
        self, handler: BaseWorkerHandler, bad: dict[str, Any]
    ) -> None:
        with pytest.raises(InvalidRequestError):
            await collect(handler, bad)

    # -- optional capabilities ------------------------------------------------------------

    async def test_logprobs(self, handler: BaseWorkerHandler) -> None:
        if not self.supports_logprobs:
            pytest.skip("engine does not report logprobs")
        outs = await collect(handler, make_request(self.prompt, max_tokens=5, logprobs=2))
        lps = [lp for out in outs for lp in (out.get("log_probs") or [])]
        assert len(lps) == 5 and all(lp <= 0.0 for lp in lps)
        tops = [t for out in outs for t in (out.get("top_logprobs") or [])]
        assert len(tops) == 5 and all(len(t) >= 1 for t in tops)

    async def test_logprobs_zero_has_no_alternatives(self, handler: BaseWorkerHandler) -> None:
        """`logprobs: 0` (chat `top_logprobs: 0`): the chosen tokens' values, no alternatives."""
        if not self.supports_logprobs:
            pytest.skip("engine does not report logprobs")
        outs = await collect(handler, make_request(self.prompt, max_tokens=3, logprobs=0))
        assert len([lp for out in outs for lp in (out.get("log_probs") or [])]) == 3
        assert all(top == [] for out in outs for top in (out.get("top_logprobs") or []))

    async def test_prompt_logprobs_come_once_with_the_first_tokens(
        self, handler: BaseWorkerHandler
    ) -> None:
        """`prompt_logprobs`: one entry per prompt token on the first output (None for the
        first token), alternatives as asked; the generated tokens' own as usual."""
        if not self.supports_prompt_logprobs:
            pytest.skip("engine does not report prompt logprobs")
        req = make_request(self.prompt, max_tokens=4, logprobs=1, prompt_logprobs=2)
        outs = await collect(handler, req)
        first = next(i for i, out in enumerate(outs) if out.get("prompt_log_probs") is not None)
        assert not tokens_of(outs[:first]), "prompt logprobs came after the first token"
        assert all(out.get("prompt_log_probs") is None for out in outs[first + 1 :])
        values = outs[first]["prompt_log_probs"]
        tops = outs[first]["prompt_top_logprobs"]
        assert len(values) == len(tops) == len(self.prompt)
        assert values[0] is None and tops[0] == []
        assert all(isinstance(v, float) and v <= 0.0 for v in values[1:])
        assert all(1 <= len(top) <= 2 for top in tops[1:])
        assert all(top[i][1] >= top[i + 1][1] for top in tops for i in range(len(top) - 1))
        ranks = outs[first].get("prompt_ranks")
        if ranks is not None:
            assert len(ranks) == len(self.prompt) and ranks[0] is None
        assert len(tokens_of(outs)) == 4
        assert len([lp for out in outs for lp in (out.get("log_probs") or [])]) == 4
        assert self.active_requests(handler) == 0

    async def test_prompt_logprobs_without_output_tokens(self, handler: BaseWorkerHandler) -> None:
        """`max_tokens` 0 with `prompt_logprobs` (scoring a prompt: `echo` with 0 tokens): the
        engine prefills, and only the prompt's log-probabilities come back."""
        if not self.supports_prompt_logprobs:
            pytest.skip("engine does not report prompt logprobs")
        outs = await collect(handler, make_request(self.prompt, max_tokens=0, prompt_logprobs=0))
        assert tokens_of(outs) == []
        assert outs[-1]["finish_reason"] == "length"
        assert outs[-1]["usage"].get("completion_tokens", 0) == 0
        values = [out["prompt_log_probs"] for out in outs if out.get("prompt_log_probs")]
        assert len(values) == 1 and len(values[0]) == len(self.prompt)
        assert all(top == [] for out in outs for top in out.get("prompt_top_logprobs") or ())
        assert self.active_requests(handler) == 0

    async def test_prompt_logprobs_are_refused_when_not_supported(
        self, handler: BaseWorkerHandler
    ) -> None:
        """An engine that cannot return them refuses the request (a 400 for the client)."""
        if self.supports_prompt_logprobs:
            pytest.skip("engine reports prompt logprobs")
        with pytest.raises(InvalidRequestError):
            await collect(handler, make_request(self.prompt, max_tokens=2, prompt_logprobs=1))
        assert self.active_requests(handler) == 0

    @pytest.mark.parametrize(
        "guided",
        [
            {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
            {"json_object": True},
            {"regex": "[a-z]{2,4}"},
            {"choice": ["yes", "no"]},
            {"grammar": 'root ::= "a" | "b"'},
        ],
        ids=["json", "json_object", "regex", "choice", "grammar"],
    )
    async def test_guided_decoding_is_served(
        self, handler: BaseWorkerHandler, guided: dict[str, Any]
    ) -> None:
        if not self.supports_guided_decoding:
            pytest.skip("engine does not take structured-output constraints")
        outs = await collect(
            handler, make_request(self.prompt, max_tokens=64, guided_decoding=guided)
        )
        assert outs[-1]["finish_reason"] in ("eos", "stop", "length")
        assert 0 < len(tokens_of(outs)) <= 64
        assert self.active_requests(handler) == 0

    @pytest.fixture
    def prefill_handler(self) -> BaseWorkerHandler:
        raise NotImplementedError("supply `prefill_handler` when supports_disaggregation")

    @pytest.fixture
    def decode_handler(self) -> BaseWorkerHandler:
        raise NotImplementedError("supply `decode_handler` when supports_disaggregation")

    async def test_disaggregated_handoff(self, request: pytest.FixtureRequest) -> None:
        if not self.supports_disaggregation:
            pytest.skip("engine has no disaggregated roles")
        prefill: BaseWorkerHandler = request.getfixturevalue("prefill_handler")
        decode: BaseWorkerHandler = request.getfixturevalue("decode_handler")
        # the prompt's log-probabilities, when asked for, are the prefill worker's to return
        prompt_lp = 1 if self.supports_prompt_logprobs else None
        preq = PreprocessedRequest.from_wire(
            make_request(self.prompt, max_tokens=10, prompt_logprobs=prompt_lp)
        )
        stream = prefill.generate(preq.prefill_leg().to_wire(), Context())
        params = None
        prefill_outs = []
        async for out in stream:  # as the frontend does: hand off as soon as the params come
            prefill_outs.append(out)
            if out.get("disaggregated_params") is not None:
                params = out["disaggregated_params"]
                break
        assert params is not None, "the prefill worker returned no transfer parameters"

        async def rest_of_prefill() -> None:
            async for out in stream:  # some engines finish prefill only once decode connects
                prefill_outs.append(out)

        prefill_rest = asyncio.create_task(rest_of_prefill())
        outs = await collect(decode, preq.with_transfer(params).to_wire())
        await asyncio.wait_for(prefill_rest, 30)
        assert len(tokens_of(outs)) == 10
        assert outs[-1]["finish_reason"] == "length"
        assert all(out.get("prompt_log_probs") is None for out in outs)
        if prompt_lp is not None:
            found = [o["prompt_log_probs"] for o in prefill_outs if o.get("prompt_log_probs")]
            assert len(found) == 1 and len(found[0]) == len(self.prompt)

    async def test_prefill_computes_one_token_and_leaves_the_request_alone(
        self, request: pytest.FixtureRequest
    ) -> None:
        """Whatever `max_tokens` a prefill worker is sent, it prefills (one token); the
        caller's request object is not flagged or changed."""
        if not self.supports_disaggregation:
            pytest.skip("engine has no disaggregated roles")
        prefill: BaseWorkerHandler = request.getfixturevalue("prefill_handler")
        req = PreprocessedRequest.from_wire(make_request(self.prompt, max_tokens=10))
        before = msgspec.msgpack.encode(req)
        outs: list[dict[str, Any]] = []
        async with contextlib.aclosing(prefill.generate(req, Context())) as stream:
            async for out in stream:
                outs.append(out)
                if out.get("disaggregated_params") is not None:
                    break  # the rest is the transfer: some engines need a decode worker for it
        assert outs and outs[-1].get("disaggregated_params") is not None
        assert len(tokens_of(outs)) <= 1
        assert msgspec.msgpack.encode(req) == before
