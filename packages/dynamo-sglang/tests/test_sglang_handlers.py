"""The SGLang handlers against the fake `sglang` (tests/fakes, SGLang 0.5.23's interface):
the conformance kit, cumulative output, finish reasons, bootstrap hand-off."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import pytest

from dynamo_core.errors import EngineError, InvalidRequestError
from dynamo_core.llm.protocol import PreprocessedRequest
from dynamo_core.runtime import Context
from dynamo_core.testing.conformance import HandlerConformance, collect, make_request, tokens_of
from dynamo_sglang.handlers import (
    DecodeHandler,
    PrefillHandler,
    WorkerHandler,
    finish_reason,
    sampling_params,
)
from sglang_testing import TINY, free_port


def make_engine(sglang: ModuleType, **server_args: Any) -> Any:
    return sglang.Engine(server_args=sglang.ServerArgs(model_path=str(TINY), **server_args))


def start(engines: list[Any], sglang: ModuleType, **server_args: Any) -> Any:
    engine = make_engine(sglang, **server_args)
    engines.append(engine)
    return engine


def disagg_pair(engines: list[Any], sglang: ModuleType) -> tuple[PrefillHandler, DecodeHandler]:
    port = free_port()
    prefill = start(
        engines, sglang, disaggregation_mode="prefill", disaggregation_bootstrap_port=port
    )
    decode = start(engines, sglang, disaggregation_mode="decode")
    return (
        PrefillHandler(prefill, bootstrap_host="127.0.0.1", bootstrap_port=port),
        DecodeHandler(decode),
    )


class TestWorkerHandler(HandlerConformance):
    supports_logprobs = True
    supports_prompt_logprobs = True
    supports_disaggregation = True
    supports_guided_decoding = True

    @pytest.fixture
    def handler(self, engines: list[Any], fake_sglang: ModuleType) -> WorkerHandler:
        return WorkerHandler(start(engines, fake_sglang))

    def active_requests(self, handler: Any) -> int:
        return len(handler.engine.tokenizer_manager.rid_to_state)

    def break_engine(self, handler: Any) -> None:
        handler.engine.fail_next = RuntimeError("CUDA error: out of memory")

    @pytest.fixture
    def pair(
        self, engines: list[Any], fake_sglang: ModuleType
    ) -> tuple[PrefillHandler, DecodeHandler]:
        return disagg_pair(engines, fake_sglang)

    @pytest.fixture
    def prefill_handler(self, pair: tuple[PrefillHandler, DecodeHandler]) -> PrefillHandler:
        return pair[0]

    @pytest.fixture
    def decode_handler(self, pair: tuple[PrefillHandler, DecodeHandler]) -> DecodeHandler:
        return pair[1]

    async def test_disaggregated_handoff(self, request: pytest.FixtureRequest) -> None:
        """The kit's hand-off test, run the way the frontend runs it: SGLang's prefill engine
        waits for the decode engine to connect, so the decode leg starts as soon as the
        parameters arrive, while the prefill leg is still running (the kit's own version
        drains the prefill leg first, which would wait out SGLang's bootstrap timeout)."""
        prefill: PrefillHandler = request.getfixturevalue("prefill_handler")
        decode: DecodeHandler = request.getfixturevalue("decode_handler")
        aggregated: WorkerHandler = request.getfixturevalue("handler")
        req = make_request(self.prompt, max_tokens=10)
        leg = prefill.generate({**req, "stop_conditions": {"max_tokens": 1}}, Context())
        first = await anext(leg)
        params = first["disaggregated_params"]
        assert set(params) == {"bootstrap_host", "bootstrap_port", "bootstrap_room"}
        assert params["bootstrap_host"] == "127.0.0.1"
        assert 0 <= params["bootstrap_room"] < 2**63
        assert prefill.engine.calls == []  # handed out before the prefill even started

        async def rest(gen: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
            return [out async for out in gen]

        prefill_rest = asyncio.create_task(rest(leg))
        outs = await asyncio.wait_for(collect(decode, {**req, "disaggregated_params": params}), 10)
        prefill_outs = await asyncio.wait_for(prefill_rest, 10)
        assert prefill_outs[-1]["finish_reason"] == "length"
        assert len(tokens_of(outs)) == 10
        assert outs[-1]["finish_reason"] == "length"
        # the decode engine got the very parameters, and continued the prefill's first token
        call = decode.engine.calls[-1]
        assert (call["bootstrap_host"], call["bootstrap_port"], call["bootstrap_room"]) == (
            params["bootstrap_host"],
            params["bootstrap_port"],
            params["bootstrap_room"],
        )
        assert prefill.engine.calls[-1]["bootstrap_room"] == params["bootstrap_room"]
        assert tokens_of(outs)[0] == tokens_of(prefill_outs)[0]
        assert tokens_of(outs) == tokens_of(await collect(aggregated, req))
        assert self.active_requests(prefill) == self.active_requests(decode) == 0


class TestIncrementalOutput(HandlerConformance):
    """The same kit on an engine run with --incremental-streaming-output (deltas, not sums)."""

    supports_logprobs = True
    supports_prompt_logprobs = True

    @pytest.fixture
    def handler(self, engines: list[Any], fake_sglang: ModuleType) -> WorkerHandler:
        engine = start(engines, fake_sglang, incremental_streaming_output=True)
        return WorkerHandler(engine, incremental_output=True)

    def active_requests(self, handler: Any) -> int:
        return len(handler.engine.tokenizer_manager.rid_to_state)

    def break_engine(self, handler: Any) -> None:
        handler.engine.fail_next = RuntimeError("CUDA error: out of memory")


async def test_cumulative_output_becomes_new_tokens(
    engines: list[Any], fake_sglang: ModuleType
) -> None:
    cumulative = WorkerHandler(start(engines, fake_sglang))
    deltas = WorkerHandler(
        start(engines, fake_sglang, incremental_streaming_output=True), incremental_output=True
    )
    req = make_request(list(range(10, 30)), max_tokens=20, logprobs=2)
    a = await collect(cumulative, req)
    b = await collect(deltas, req)
    assert [o.get("token_ids") for o in a] == [o.get("token_ids") for o in b]
    assert all(len(o.get("token_ids", [])) <= 1 for o in a)  # one token per step, never sums
    assert len(tokens_of(a)) == 20
    assert [o.get("log_probs") for o in a] == [o.get("log_probs") for o in b]
    assert all(len(t) == 2 for o in a for t in o.get("top_logprobs") or [])


async def test_request_maps_to_sglang_call(engines: list[Any], fake_sglang: ModuleType) -> None:
    handler = WorkerHandler(start(engines, fake_sglang))
    req = make_request([5, 6, 7], max_tokens=4, stop_token_ids=[9], seed=7, request_id="r-1")
    req["sampling_options"].update(top_p=0.9, top_k=20)
    req["stop_conditions"]["min_tokens"] = 2
    outs = await collect(handler, req)
    call = handler.engine.calls[-1]
    assert call["rid"] == "r-1"
    assert call["input_ids"] == [5, 6, 7]
    assert call["sampling_params"] == {
        "max_new_tokens": 4,
        "min_new_tokens": 2,
        "stop_token_ids": [9],
        "ignore_eos": True,
        "temperature": 0.0,
        "top_p": 0.9,
        "top_k": 20,
        "sampling_seed": 7,
    }
    assert call["bootstrap_room"] is None
    assert outs[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 0}


async def test_cached_tokens_reported(engines: list[Any], fake_sglang: ModuleType) -> None:
    handler = WorkerHandler(start(engines, fake_sglang, page_size=4))
    prompt = list(range(100, 120))
    first = await collect(handler, make_request(prompt, max_tokens=2))
    again = await collect(handler, make_request(prompt, max_tokens=2))
    assert first[-1]["usage"]["cached_tokens"] == 0
    assert again[-1]["usage"]["cached_tokens"] == 20


@pytest.mark.parametrize(
    ("guided", "expected"),
    [
        (
            {"json": {"type": "object", "required": ["a"]}},
            {"json_schema": '{"type": "object", "required": ["a"]}'},
        ),
        ({"json_object": True}, {"json_schema": '{"type": "object"}'}),
        ({"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"choice": ["x|y", "z"]}, {"regex": r"(x\|y|z)"}),
        ({"grammar": 'root ::= "x"'}, {"ebnf": 'root ::= "x"'}),
    ],
)
async def test_guided_decoding_becomes_sglang_sampling_params(
    engines: list[Any], fake_sglang: ModuleType, guided: dict[str, Any], expected: dict[str, str]
) -> None:
    handler = WorkerHandler(start(engines, fake_sglang))
    outs = await collect(handler, make_request([5, 6, 7], max_tokens=3, guided_decoding=guided))
    assert outs[-1]["finish_reason"] == "length"
    params = handler.engine.calls[-1]["sampling_params"]
    assert {k: params[k] for k in ("json_schema", "regex", "ebnf") if k in params} == expected
    assert json.loads(params.get("json_schema", "{}")) == guided.get(
        "json", json.loads(params.get("json_schema", "{}"))
    )


async def test_sglang_refusing_a_constraint_is_invalid_request(
    engines: list[Any], fake_sglang: ModuleType
) -> None:
    """SGLang aborts a constrained request (status 400) when it has no grammar backend, or
    when the grammar does not compile: the client is told, the engine keeps serving."""
    handler = WorkerHandler(start(engines, fake_sglang, grammar_backend="none"))
    req = make_request([5, 6, 7], guided_decoding={"regex": "[a-z]+"})
    with pytest.raises(InvalidRequestError, match="--grammar-backend none"):
        await collect(handler, req)
    handler = WorkerHandler(start(engines, fake_sglang))
    with pytest.raises(InvalidRequestError, match="Invalid grammar request"):
        await collect(handler, make_request([5, 6, 7], guided_decoding={"regex": "(unclosed"}))
    assert handler.engine.tokenizer_manager.rid_to_state == {}
    assert len(tokens_of(await collect(handler, make_request([5, 6, 7], max_tokens=2)))) == 2


def test_sampling_params_only_what_is_set() -> None:
    req = PreprocessedRequest(token_ids=[1])
    assert sampling_params(req) == {}


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (None, None),
        ({"type": "length", "length": 5}, "length"),
        ({"type": "stop", "matched": 3}, "eos"),
        ({"type": "stop", "matched": 9}, "stop"),
        ({"type": "stop", "matched": "</s>"}, "stop"),
    ],
)
def test_finish_reasons(reason: Any, expected: str | None) -> None:
    assert finish_reason(reason, [1, 3]) == expected


def test_abort_finish_reasons_are_errors() -> None:
    with pytest.raises(InvalidRequestError, match="too long"):
        finish_reason({"type": "abort", "message": "too long", "status_code": 400}, [])
    with pytest.raises(EngineError, match="KV transfer failed"):
        finish_reason({"type": "abort", "message": "KV transfer failed", "status_code": 500}, [])


async def test_engine_value_error_is_invalid_request(
    engines: list[Any], fake_sglang: ModuleType
) -> None:
    handler = WorkerHandler(start(engines, fake_sglang, context_length=16))
    with pytest.raises(InvalidRequestError, match="context length"):
        await collect(handler, make_request(list(range(10, 40))))


async def test_decode_worker_needs_bootstrap_params(
    engines: list[Any], fake_sglang: ModuleType
) -> None:
    _, decode = disagg_pair(engines, fake_sglang)
    with pytest.raises(InvalidRequestError, match="prefilled by an SGLang prefill worker"):
        await collect(decode, make_request([1, 2, 3]))
    bad = {"bootstrap_host": "h", "bootstrap_port": "x", "bootstrap_room": 1}
    with pytest.raises(InvalidRequestError, match="bootstrap parameters"):
        await collect(decode, make_request([1, 2, 3], disaggregated_params=bad))
    assert decode.engine.calls == []


async def test_prefill_failure_after_handoff_is_an_error(
    engines: list[Any], fake_sglang: ModuleType
) -> None:
    prefill, decode = disagg_pair(engines, fake_sglang)
    prefill.engine.prefill_fail = True
    decode.engine.transfer_timeout = 0.5
    req = make_request(list(range(10, 30)), max_tokens=5)
    leg = prefill.generate({**req, "stop_conditions": {"max_tokens": 1}}, Context())
    params = (await anext(leg))["disaggregated_params"]
    decoding = asyncio.create_task(collect(decode, {**req, "disaggregated_params": params}))
    with pytest.raises(EngineError, match="KV transfer failed"):
        async for _ in leg:
            pass
    with pytest.raises(EngineError, match="KV transfer failed"):
        await decoding  # SGLang's own timeout; the frontend cancels it long before


async def test_cancelled_decode_while_waiting_for_kv(
    engines: list[Any], fake_sglang: ModuleType
) -> None:
    prefill, decode = disagg_pair(engines, fake_sglang)
    prefill.engine.prefill_fail = True
    req = make_request(list(range(10, 30)), max_tokens=5, request_id="d-1")
    leg = prefill.generate({**req, "stop_conditions": {"max_tokens": 1}}, Context())
    params = (await anext(leg))["disaggregated_params"]
    decoding = asyncio.create_task(collect(decode, {**req, "disaggregated_params": params}))
    with pytest.raises(EngineError):
        async for _ in leg:
            pass
    await asyncio.sleep(0.05)
    assert len(decode.engine.tokenizer_manager.rid_to_state) == 1
    decoding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await decoding
    assert decode.engine.tokenizer_manager.rid_to_state == {}
    assert "d-1" in decode.engine.tokenizer_manager.aborted


async def test_prompt_logprobs_map_to_sglang(engines: list[Any], fake_sglang: ModuleType) -> None:
    """`prompt_logprobs`: `return_logprob` from the first prompt token (`logprob_start_len=0`),
    one `top_logprobs_num` for both sides (the larger), each side cut to its own count; the
    prompt's from `input_token_logprobs` / `input_top_logprobs`, once."""
    from sglang.srt.entrypoints.engine import input_logprobs

    handler = WorkerHandler(start(engines, fake_sglang))
    prompt = list(range(10, 30))
    outs = await collect(handler, make_request(prompt, max_tokens=3, logprobs=1, prompt_logprobs=3))
    call = handler.engine.calls[-1]
    assert (call["return_logprob"], call["logprob_start_len"], call["top_logprobs_num"]) == (
        True,
        0,
        3,
    )
    assert all(len(t) == 1 for o in outs for t in o.get("top_logprobs") or [])
    (first,) = [o for o in outs if o.get("prompt_log_probs") is not None]
    assert first["token_ids"]  # with the first token
    expected, expected_tops = input_logprobs(prompt, 0, 3)
    assert first["prompt_log_probs"] == [t[0] for t in expected]
    assert first["prompt_top_logprobs"] == [
        [],
        *([(t[1], t[0]) for t in top] for top in expected_tops[1:] if top is not None),
    ]
    assert "prompt_ranks" not in first  # SGLang reports none

    # logprobs alone: SGLang's default start (the output only)
    await collect(handler, make_request(prompt, max_tokens=2, logprobs=2))
    assert handler.engine.calls[-1]["logprob_start_len"] is None


async def test_prefill_worker_returns_the_prompt_logprobs(
    engines: list[Any], fake_sglang: ModuleType
) -> None:
    """Disaggregated: the prefill worker (which runs the prompt) returns them, after its
    hand-off; the decode leg is not asked for them."""
    prefill, decode = disagg_pair(engines, fake_sglang)
    req = PreprocessedRequest.from_wire(
        make_request(list(range(10, 30)), max_tokens=5, prompt_logprobs=1)
    )
    leg = prefill.generate(req.prefill_leg().to_wire(), Context())
    params = (await anext(leg))["disaggregated_params"]

    async def rest() -> list[dict[str, Any]]:
        return [out async for out in leg]

    prefill_rest = asyncio.create_task(rest())
    outs = await asyncio.wait_for(collect(decode, req.with_transfer(params).to_wire()), 10)
    prefill_outs = await asyncio.wait_for(prefill_rest, 10)
    assert len(tokens_of(outs)) == 5 and not any(o.get("prompt_log_probs") for o in outs)
    found = [o["prompt_log_probs"] for o in prefill_outs if o.get("prompt_log_probs")]
    assert len(found) == 1 and len(found[0]) == 20
    assert decode.engine.calls[-1]["logprob_start_len"] is None
