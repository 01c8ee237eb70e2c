"""The handlers on a fake `AsyncLLM` (tests/fake_vllm, written against vLLM 0.32's interface):
the conformance kit, plus what is specific to vLLM (SamplingParams, finish reasons, transfer
parameters, prefix-cache usage)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY
from dynamo_core.errors import EngineError, InvalidRequestError
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.llm.protocol import PreprocessedRequest
from dynamo_core.runtime import Context
from dynamo_core.testing.conformance import HandlerConformance, collect, make_request
from dynamo_vllm.handlers import DecodeHandler, PrefillHandler, WorkerHandler, sampling_params

CONNECTOR = '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'


def make_engine(*flags: str) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    parser = FlexibleArgumentParser()
    AsyncEngineArgs.add_cli_args(parser)
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(TINY), *flags]))
    return AsyncLLM.from_engine_args(args)


@pytest.fixture(autouse=True)
def _fake(fake_vllm: Path) -> Iterator[None]:
    yield


class TestVllmHandlerConformance(HandlerConformance):
    supports_logprobs = True
    supports_prompt_logprobs = True
    supports_disaggregation = True
    supports_guided_decoding = True

    @pytest.fixture
    def handler(self) -> BaseWorkerHandler:
        return WorkerHandler(make_engine())

    @pytest.fixture
    def prefill_handler(self) -> BaseWorkerHandler:
        return PrefillHandler(make_engine("--kv-transfer-config", CONNECTOR))

    @pytest.fixture
    def decode_handler(self) -> BaseWorkerHandler:
        return DecodeHandler(make_engine("--kv-transfer-config", CONNECTOR))

    def active_requests(self, handler: BaseWorkerHandler) -> int:
        return len(handler.engine.requests)

    def break_engine(self, handler: BaseWorkerHandler) -> None:
        handler.engine.fail_next = RuntimeError("CPU out of memory")


def test_sampling_params_from_the_request() -> None:
    from vllm.sampling_params import RequestOutputKind

    req = PreprocessedRequest.from_wire(
        {
            **make_request([1, 2, 3], max_tokens=7, stop_token_ids=[5, 6], logprobs=3, seed=9),
            "sampling_options": {"temperature": 0.5, "top_p": 0.9, "seed": 9},
        }
    )
    req.stop_conditions.min_tokens = 2
    params = sampling_params(req, {"temperature": 0.7, "top_k": 20})
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 20, 9)
    assert (params.max_tokens, params.min_tokens, params.stop_token_ids) == (7, 2, [5, 6])
    assert (params.ignore_eos, params.logprobs) == (True, 3)
    assert params.output_kind is RequestOutputKind.DELTA
    assert params.detokenize is False


@pytest.mark.parametrize(
    ("guided", "expected"),
    [
        ({"json": {"type": "array", "items": {"type": "integer"}}},
         {"json": {"type": "array", "items": {"type": "integer"}}}),
        ({"json_object": True}, {"json_object": True}),
        ({"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"grammar": 'root ::= "x"'}, {"grammar": 'root ::= "x"'}),
    ],
)  # fmt: skip
async def test_guided_decoding_becomes_structured_outputs(
    guided: dict[str, Any], expected: dict[str, Any]
) -> None:
    from vllm.sampling_params import StructuredOutputsParams

    handler = WorkerHandler(make_engine())
    outs = await collect(handler, make_request([1, 2, 3], max_tokens=3, guided_decoding=guided))
    assert outs[-1]["finish_reason"] == "length"
    ((_, params),) = handler.engine.seen
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    for name in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"):
        assert getattr(params.structured_outputs, name) == expected.get(name)
    plain = sampling_params(PreprocessedRequest.from_wire(make_request([1, 2, 3])))
    assert plain.structured_outputs is None


async def test_prefill_and_decode_legs_carry_the_constraint() -> None:
    prefill = PrefillHandler(make_engine("--kv-transfer-config", CONNECTOR))
    decode = DecodeHandler(make_engine("--kv-transfer-config", CONNECTOR))
    req = make_request([1, 2, 3], max_tokens=4, guided_decoding={"regex": "[ab]+"})
    (out,) = await collect(prefill, {**req, "stop_conditions": {"max_tokens": 1}})
    await collect(decode, {**req, "disaggregated_params": out["disaggregated_params"]})
    for engine in (prefill.engine, decode.engine):
        ((_, params),) = engine.seen
        assert params.structured_outputs.regex == "[ab]+"


async def test_vllm_refusing_a_constraint_is_invalid_request() -> None:
    """vLLM's own validation (a `VLLMValidationError`, a client error) reaches the client as
    `InvalidRequestError`, not as an engine failure."""
    handler = WorkerHandler(make_engine())
    with pytest.raises(InvalidRequestError, match="vLLM rejected the request: Failed to convert"):
        await collect(handler, make_request([1, 2, 3], guided_decoding={"regex": "(unclosed"}))
    assert handler.engine.requests == set()
    assert len(await collect(handler, make_request([1, 2, 3], max_tokens=2))) >= 1


async def test_generation_config_defaults_and_request_seed_reach_the_engine() -> None:
    handler = WorkerHandler(make_engine(), default_sampling={"temperature": 0.6, "top_k": 20})
    await collect(handler, make_request(list(range(20)), max_tokens=2, seed=77))
    ((_, params),) = handler.engine.seen
    assert (params.temperature, params.top_k, params.seed) == (0.0, 20, 77)


async def test_vllm_eos_and_stop_reasons_are_told_apart() -> None:
    from vllm.v1.engine import async_llm

    handler = WorkerHandler(make_engine())
    full = [
        t
        for o in await collect(handler, make_request([3, 4], max_tokens=8))
        for t in o.get("token_ids", [])
    ]
    # the engine stops on its own (a stop token id): reason "stop", the token not in the output
    outs = await collect(handler, make_request([3, 4], max_tokens=8, stop_token_ids=[full[2]]))
    assert outs[-1]["finish_reason"] == "stop"
    assert [t for o in outs for t in o.get("token_ids", [])] == full[:2]
    # the engine's own eos (vLLM reports "stop" without a stop_reason): "eos", token kept
    old = async_llm.EOS_TOKEN_ID
    async_llm.EOS_TOKEN_ID = full[3]
    try:
        outs = await collect(handler, make_request([3, 4], max_tokens=8, ignore_eos=False))
    finally:
        async_llm.EOS_TOKEN_ID = old
    assert outs[-1]["finish_reason"] == "eos"
    assert [t for o in outs for t in o.get("token_ids", [])] == full[:4]


async def test_prefix_cache_hits_are_reported_in_usage() -> None:
    handler = WorkerHandler(make_engine())
    prompt = list(range(100, 140))  # 2 full blocks of 16
    first = await collect(handler, make_request(prompt, max_tokens=2))
    second = await collect(handler, make_request(prompt, max_tokens=2))
    assert first[-1]["usage"].get("cached_tokens", 0) == 0
    assert second[-1]["usage"]["cached_tokens"] == 32


async def test_max_tokens_zero_never_reaches_vllm() -> None:
    handler = WorkerHandler(make_engine())
    outs = await collect(handler, make_request([1, 2], max_tokens=0))
    assert [o["finish_reason"] for o in outs] == ["length"]
    assert not outs[0].get("token_ids")
    assert handler.engine.seen == []


async def test_prefill_asks_for_remote_decode_and_decode_passes_params_on() -> None:
    prefill = PrefillHandler(make_engine("--kv-transfer-config", CONNECTOR))
    decode = DecodeHandler(make_engine("--kv-transfer-config", CONNECTOR))
    req = make_request(list(range(40)), max_tokens=5)
    outs = await collect(prefill, {**req, "stop_conditions": {"max_tokens": 1}})
    ((_, params),) = prefill.engine.seen
    assert params.extra_args == {"kv_transfer_params": {"do_remote_decode": True}}
    assert (params.max_tokens, params.min_tokens) == (1, 1)
    assert len(outs) == 1 and outs[0]["finish_reason"] == "length"
    transfer = outs[0]["disaggregated_params"]["kv_transfer_params"]
    assert transfer["do_remote_prefill"] is True
    assert transfer["remote_engine_id"] == prefill.engine.engine_id

    result = await collect(decode, {**req, "disaggregated_params": outs[0]["disaggregated_params"]})
    assert decode.engine.transfers == [transfer]
    ((_, dparams),) = decode.engine.seen
    assert dparams.extra_args == {"kv_transfer_params": transfer}
    assert sum(len(o.get("token_ids", [])) for o in result) == 5


async def test_prefill_without_a_kv_connector_is_an_engine_error() -> None:
    prefill = PrefillHandler(make_engine())
    with pytest.raises(EngineError):
        await collect(prefill, make_request(list(range(20)), max_tokens=1))


async def test_decode_without_params_serves_whole_requests() -> None:
    decode = DecodeHandler(make_engine())
    outs = await collect(decode, make_request(list(range(20)), max_tokens=4))
    assert sum(len(o.get("token_ids", [])) for o in outs) == 4
    assert decode.engine.seen[0][1].extra_args is None


async def test_abort_reaches_the_engine() -> None:
    handler = WorkerHandler(make_engine())
    ctx = Context()
    gen = handler.generate(make_request(list(range(20)), max_tokens=10_000), ctx)
    first = await gen.__anext__()
    assert first["token_ids"]
    assert handler.engine.requests
    aborted: list[str] = []
    abort = handler.engine.abort

    async def spy(request_id: str, internal: bool = False) -> None:
        aborted.append(request_id)
        await abort(request_id)

    handler.engine.abort = spy
    ctx.stop_generating()
    await gen.aclose()
    for _ in range(100):  # BaseWorkerHandler.generate leaves closing its inner stream to the loop
        if aborted:
            break
        await asyncio.sleep(0.01)
    assert aborted == [ctx.id]
    assert not handler.engine.requests


def test_logprob_alternatives_in_the_order_vllm_shows_them() -> None:
    """Most likely first, the chosen token first among equals (vLLM's top-k may put an equal
    one before it, its server lists the chosen one first); none when 0 are asked for."""
    from types import SimpleNamespace

    from vllm.logprobs import Logprob

    from dynamo_vllm.handlers import logprobs

    # greedy chose 7, tied with 9 which top-k ranked first; 8 is less likely
    entry = {7: Logprob(-1.5, rank=2), 9: Logprob(-1.5, rank=1), 8: Logprob(-2.0, rank=3)}
    output = SimpleNamespace(token_ids=[7], logprobs=[entry])
    assert logprobs(output, 2) == ([-1.5], [[(7, -1.5), (9, -1.5), (8, -2.0)]])
    only = SimpleNamespace(token_ids=[7], logprobs=[{7: Logprob(-1.5, rank=1)}])
    assert logprobs(only, 0) == ([-1.5], [[]])


def test_prompt_logprobs_from_vllms_maps() -> None:
    """vLLM's map per prompt token: the token first (its own rank), then the top N by rank;
    the alternatives are the top N in rank order, the token among them only when it is one
    of them (the map then has N entries, the token's rank the top-N one)."""
    from vllm.logprobs import Logprob

    from dynamo_vllm.handlers import prompt_logprobs

    entries = [
        None,
        {7: Logprob(-3.0, rank=5), 1: Logprob(-0.5, rank=1), 2: Logprob(-1.0, rank=2)},
        {8: Logprob(-1.0, rank=2), 3: Logprob(-1.0, rank=1)},  # a tie: 8 is second of two
        {9: Logprob(-float("inf"), rank=40)},  # 0 alternatives asked for
    ]
    values, tops, ranks = prompt_logprobs(entries[:3], [4, 7, 8], 2)
    assert values == [None, -3.0, -1.0]
    assert tops == [[], [(1, -0.5), (2, -1.0)], [(3, -1.0), (8, -1.0)]]
    assert ranks == [None, 5, 2]
    values, tops, ranks = prompt_logprobs([None, entries[3]], [4, 9], 0)
    assert (values, tops, ranks) == ([None, -float("inf")], [[], []], [None, 40])


async def test_prompt_logprobs_reach_vllm_and_come_back_whole() -> None:
    """`prompt_logprobs` becomes `SamplingParams.prompt_logprobs`; what vLLM sends in pieces
    (chunked prefill) comes back once, whole, with the first token."""
    handler = WorkerHandler(make_engine())
    prompt = list(range(10, 50))  # longer than the fake's prefill chunk
    outs = await collect(handler, make_request(prompt, max_tokens=3, prompt_logprobs=2))
    ((_, params),) = handler.engine.seen
    assert params.prompt_logprobs == 2
    with_prompt = [o for o in outs if o.get("prompt_log_probs") is not None]
    assert len(with_prompt) == 1 and with_prompt[0]["token_ids"]
    assert len(with_prompt[0]["prompt_log_probs"]) == len(prompt)
    assert all(len(top) == 2 for top in with_prompt[0]["prompt_top_logprobs"][1:])
    assert len([t for o in outs for t in o.get("token_ids", [])]) == 3


async def test_prompt_logprobs_beyond_vllms_limit_are_refused() -> None:
    handler = WorkerHandler(make_engine())
    with pytest.raises(InvalidRequestError, match="greater than max allowed: 20"):
        await collect(handler, make_request([1, 2, 3], max_tokens=2, prompt_logprobs=21))
    assert not handler.engine.requests


async def test_a_prefill_worker_hands_the_prompt_logprobs_over() -> None:
    prefill = PrefillHandler(make_engine("--kv-transfer-config", CONNECTOR))
    req = make_request(list(range(10, 40)), max_tokens=4, prompt_logprobs=1)
    (out,) = await collect(prefill, {**req, "stop_conditions": {"max_tokens": 1}})
    assert out["disaggregated_params"] and len(out["prompt_log_probs"]) == 30
