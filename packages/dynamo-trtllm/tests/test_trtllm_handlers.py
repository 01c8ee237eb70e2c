"""The TensorRT-LLM handlers against a fake `tensorrt_llm` (tests/fake_trtllm): the conformance
kit, and what is particular to TensorRT-LLM (sampling parameters, finish reasons, the
disaggregated hand-off).

The fake follows these TensorRT-LLM LLM API signatures and shapes (release 1.0, read from
NVIDIA/TensorRT-LLM at version 1.0.0rc4: tensorrt_llm/llmapi/llm.py, tensorrt_llm/executor/result.py,
tensorrt_llm/sampling_params.py, tensorrt_llm/disaggregated_params.py, tensorrt_llm/llmapi/llm_args.py,
tensorrt_llm/llmapi/trtllm-llmapi-launch; docs nvidia.github.io/TensorRT-LLM llm-api reference
and examples llm_inference_async_streaming.py, llm_inference_kv_events.py; the event and stats
map shapes as consumed by ai-dynamo/dynamo components/src/dynamo/trtllm/publisher.py):

    LLM(model: str | Path, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init=False,
        trust_remote_code=False, tensor_parallel_size=1, dtype="auto", revision=None,
        tokenizer_revision=None, **kwargs)          # kwargs: LlmArgs fields, pydantic, extra="forbid"
        # pipeline_parallel_size, backend, max_batch_size, max_num_tokens, max_seq_len,
        # kv_cache_config: KvCacheConfig, enable_iter_perf_stats, cache_transceiver_config,
        # disable_overlap_scheduler, ...; llm.args.max_seq_len resolved after start
    LLM.generate_async(inputs: list[int] | TokensPrompt, sampling_params: SamplingParams | None = None,
        lora_request=None, prompt_adapter_request=None, streaming: bool = False,
        kv_cache_retention_config=None, disaggregated_params: DisaggregatedParams | None = None,
        ...) -> RequestOutput
    async for res in RequestOutput: res.finished: bool; res.outputs[0]: CompletionOutput
    RequestOutput.abort() -> None
    CompletionOutput(index, text, token_ids (cumulative), cumulative_logprob,
        logprobs: list[dict[int, Logprob(logprob, rank)]] (TokenLogprobs), finish_reason:
        "stop" | "length" | "timeout" | "cancelled" | None, stop_reason: int | str | None,
        disaggregated_params: DisaggregatedParams | None); .token_ids_diff (new ids)
    tensorrt_llm.executor.RequestError(RuntimeError)   # a failed request, raised while iterated
    SamplingParams(*, end_id=None, pad_id=None, max_tokens=32, stop=None, stop_token_ids=None,
        n=1, top_k=None, top_p=None, seed=None, temperature=None, min_tokens=None,
        repetition_penalty=None, presence_penalty=None, frequency_penalty=None, min_p=None,
        logprobs=None, ignore_eos=False, detokenize=True, guided_decoding=None, ...)
    tensorrt_llm.llmapi.GuidedDecodingParams(*, json: str | BaseModel | dict | None = None,
        regex=None, grammar=None, json_object: bool = False, structural_tag=None)
        # one guide per request (ValueError otherwise, from SamplingParams.__post_init__);
        # enforced only with LLM(guided_decoding_backend="xgrammar" | "llguidance")
    tensorrt_llm.llmapi.KvCacheConfig(enable_block_reuse=True, free_gpu_memory_fraction=0.9,
        event_buffer_max_size=0, dtype="auto", ...)   # pydantic, extra="forbid"
    tensorrt_llm.llmapi.DisaggregatedParams(*, request_type: "context_only" | "generation_only" |
        "context_and_generation" | None, first_gen_tokens, first_gen_log_probs, ctx_request_id,
        opaque_state: bytes, draft_tokens, disagg_request_id, ctx_dp_rank, ctx_info_endpoint,
        schedule_style, multimodal_embedding_handles, multimodal_hashes)
    LLM.get_kv_cache_events_async(timeout) -> async iterable of {"event_id": int, "data": {"type":
        "created" | "stored" | "removed" | "updated", "parent_hash", "blocks": [{"block_hash",
        "tokens": [{"token_id", "token_extra_id"}], ...}], "block_hashes"}, "window_size"?}
    LLM.get_stats_async(timeout) -> async iterable of {"numActiveRequests", "numQueuedRequests",
        "kvCacheStats": {"maxNumBlocks", "usedNumBlocks", "freeNumBlocks", "tokensPerBlock"}, ...}
    LLM.shutdown()

Assumed where the sources do not say: the end token and stop tokens are not returned in
`token_ids`; a generation-only request returns the context phase's first token first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from dynamo_core.errors import EngineError, InvalidRequestError
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.llm.protocol import PreprocessedRequest
from dynamo_core.runtime import Context
from dynamo_core.testing.conformance import HandlerConformance, collect, make_request
from trtllm_testing import TINY

PROMPT = list(range(10, 42))


def tokens_of(outs: list[dict[str, Any]]) -> list[int]:
    return [t for out in outs for t in out.get("token_ids", [])]


def new_llm(trt: Any, **kwargs: Any) -> Any:
    return trt.LLM(str(TINY), **kwargs)


class TestTrtllmHandler(HandlerConformance):
    supports_logprobs = True
    supports_disaggregation = True
    supports_guided_decoding = True

    @pytest.fixture
    def handler(self, fake_trtllm: Any) -> BaseWorkerHandler:
        from dynamo_trtllm.handlers import TrtllmHandler

        return TrtllmHandler(new_llm(fake_trtllm, guided_decoding_backend="xgrammar"))

    def active_requests(self, handler: BaseWorkerHandler) -> int:
        return len(handler.engine.running)

    def break_engine(self, handler: BaseWorkerHandler) -> None:
        handler.engine.fail_next = RuntimeError("CUDA error: out of memory")

    @pytest.fixture
    def prefill_handler(self, fake_trtllm: Any) -> BaseWorkerHandler:
        from dynamo_trtllm.handlers import TrtllmPrefillHandler

        return TrtllmPrefillHandler(new_llm(fake_trtllm))

    @pytest.fixture
    def decode_handler(self, fake_trtllm: Any) -> BaseWorkerHandler:
        from dynamo_trtllm.handlers import TrtllmDecodeHandler

        return TrtllmDecodeHandler(new_llm(fake_trtllm))


# -- request -> SamplingParams ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guided", "expected"),
    [
        ({"json": {"type": "integer"}}, {"json": {"type": "integer"}}),
        ({"json_object": True}, {"json_object": True}),
        ({"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"choice": ["a.b", "c"]}, {"regex": r"(a\.b|c)"}),
        ({"grammar": 'root ::= "x"'}, {"grammar": 'root ::= "x"'}),
    ],
)
async def test_guided_decoding_becomes_guided_decoding_params(
    fake_trtllm: Any, guided: dict[str, Any], expected: dict[str, Any]
) -> None:
    from dynamo_trtllm.handlers import TrtllmHandler

    handler = TrtllmHandler(new_llm(fake_trtllm, guided_decoding_backend="xgrammar"))
    params = handler.sampling_params(
        PreprocessedRequest.from_wire(make_request(PROMPT, guided_decoding=guided))
    )
    assert isinstance(params.guided_decoding, fake_trtllm.llmapi.GuidedDecodingParams)
    empty = fake_trtllm.llmapi.GuidedDecodingParams()
    for name in ("json", "regex", "grammar", "json_object", "structural_tag"):
        assert getattr(params.guided_decoding, name) == expected.get(name, getattr(empty, name))
    assert PreprocessedRequest.from_wire(make_request(PROMPT)).guided_decoding is None
    assert (
        handler.sampling_params(PreprocessedRequest.from_wire(make_request(PROMPT))).guided_decoding
        is None
    )


async def test_guided_decoding_without_a_backend_is_refused(fake_trtllm: Any) -> None:
    """Without `guided_decoding_backend` TensorRT-LLM would generate unconstrained text."""
    from dynamo_trtllm.handlers import TrtllmHandler

    llm = new_llm(fake_trtllm)
    handler = TrtllmHandler(llm)
    req = make_request(PROMPT, guided_decoding={"json_object": True})
    with pytest.raises(InvalidRequestError, match="guided_decoding_backend: xgrammar"):
        await collect(handler, req)
    assert llm.running == set()
    outs = await collect(handler, make_request(PROMPT, max_tokens=3))  # still serving
    assert len(tokens_of(outs)) == 3


def test_sampling_params_from_request(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import TrtllmHandler

    handler = TrtllmHandler(new_llm(fake_trtllm))
    req = PreprocessedRequest.from_wire(
        {
            "token_ids": PROMPT,
            "stop_conditions": {"max_tokens": 9, "min_tokens": 2, "stop_token_ids": [7]},
            "sampling_options": {"temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 3},
            "output_options": {"logprobs": 0},
            "eos_token_ids": [5, 6],
        }
    )
    sp = handler.sampling_params(req)
    assert isinstance(sp, fake_trtllm.SamplingParams)
    assert (sp.max_tokens, sp.min_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (
        9,
        2,
        0.5,
        0.9,
        4,
        3,
    )
    assert sp.end_id == 5 and sp.stop_token_ids == [7, 6] and not sp.ignore_eos
    assert sp.detokenize is False and sp.logprobs == 1

    ignored = PreprocessedRequest.from_wire(
        {"token_ids": PROMPT, "stop_conditions": {"ignore_eos": True}, "eos_token_ids": [5]}
    )
    sp = handler.sampling_params(ignored)
    assert sp.ignore_eos and sp.end_id is None
    # no max_tokens: the base class's budget, what is left of the engine's max_seq_len (the
    # LLM API's default would be 32)
    assert handler.token_budget(ignored) == handler.engine.args.max_seq_len - len(PROMPT)


async def test_eos_token_is_returned_with_reason_eos(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import TrtllmHandler

    handler = TrtllmHandler(new_llm(fake_trtllm))
    full = tokens_of(await collect(handler, make_request(PROMPT, max_tokens=8)))
    eos = full[3]
    outs = await collect(
        handler, make_request(PROMPT, max_tokens=8, ignore_eos=False, eos_token_ids=[99, eos])
    )
    # the second eos id travels as a stop token id; the engine leaves it out, we add it back
    assert tokens_of(outs) == full[:4]
    assert outs[-1]["finish_reason"] == "eos"
    assert outs[-1]["usage"]["completion_tokens"] == 4


async def test_new_tokens_only_per_chunk(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import TrtllmHandler

    handler = TrtllmHandler(new_llm(fake_trtllm))
    outs = await collect(handler, make_request(PROMPT, max_tokens=6))
    assert [len(o.get("token_ids", [])) for o in outs] == [1] * 6


# -- the disaggregated hand-off ---------------------------------------------------------------


def test_disaggregated_params_round_trip(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import decode_disaggregated_params, encode_disaggregated_params

    params = fake_trtllm.DisaggregatedParams(
        request_type="context_only",
        first_gen_tokens=[17],
        ctx_request_id=5,
        opaque_state=b"\x00\xffstate",
        first_gen_logits=[object()],  # tensors never cross the wire
    )
    wire = encode_disaggregated_params(params)
    assert wire == {
        "first_gen_tokens": [17],
        "ctx_request_id": 5,
        "opaque_state": {"b64": "AP9zdGF0ZQ=="},
    }
    back = decode_disaggregated_params(
        msgspec.msgpack.decode(msgspec.msgpack.encode(wire)), fake_trtllm.DisaggregatedParams
    )
    assert back.request_type == "generation_only"
    assert (back.first_gen_tokens, back.ctx_request_id, back.opaque_state) == (
        [17],
        5,
        b"\x00\xffstate",
    )


async def test_prefill_yields_params_and_never_aborts_after_handoff(
    fake_trtllm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynamo_trtllm.handlers import TrtllmDecodeHandler, TrtllmHandler, TrtllmPrefillHandler

    aborted: list[int] = []
    monkeypatch.setattr(
        fake_trtllm.RequestOutput, "abort", lambda self: aborted.append(self.request_id)
    )
    prefill = TrtllmPrefillHandler(new_llm(fake_trtllm))
    req = make_request(PROMPT, max_tokens=12)
    outs = await collect(prefill, {**req, "stop_conditions": {"max_tokens": 1}})
    assert len(outs) == 1
    params = outs[0]["disaggregated_params"]
    assert set(params) == {"trtllm"}
    assert params["trtllm"]["first_gen_tokens"] == outs[0]["token_ids"]
    assert outs[0]["finish_reason"] == "length"
    assert aborted == []
    assert prefill.engine.running == set()

    decode = TrtllmDecodeHandler(new_llm(fake_trtllm))
    disagg = tokens_of(await collect(decode, {**req, "disaggregated_params": params}))
    agg = tokens_of(await collect(TrtllmHandler(new_llm(fake_trtllm)), req))
    assert disagg == agg and len(disagg) == 12


async def test_decode_without_params_serves_aggregated(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import TrtllmDecodeHandler

    outs = await collect(
        TrtllmDecodeHandler(new_llm(fake_trtllm)), make_request(PROMPT, max_tokens=5)
    )
    assert len(tokens_of(outs)) == 5


async def test_decode_rejects_bad_params(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import TrtllmDecodeHandler

    decode = TrtllmDecodeHandler(new_llm(fake_trtllm))
    req = make_request(PROMPT, max_tokens=5)
    with pytest.raises(InvalidRequestError):
        await collect(decode, {**req, "disaggregated_params": {"trtllm": "nope"}})
    wrong = {"first_gen_tokens": [20], "opaque_state": {"b64": "AAAA"}}
    with pytest.raises(EngineError, match="KV cache transfer failed"):
        await collect(decode, {**req, "disaggregated_params": {"trtllm": wrong}})
    assert decode.engine.running == set()


async def test_cancel_mid_stream_aborts_in_engine(fake_trtllm: Any) -> None:
    from dynamo_trtllm.handlers import TrtllmHandler

    handler = TrtllmHandler(new_llm(fake_trtllm))
    ctx = Context()
    gen = handler.generate(make_request(PROMPT, max_tokens=1000), ctx)
    await gen.__anext__()
    (result,) = handler.active.values()
    await gen.aclose()
    for _ in range(100):  # the inner generator is closed by the loop's finalizer
        if result._aborted:
            break
        await asyncio.sleep(0.01)
    assert result._aborted and handler.active == {}


async def test_prompt_logprobs_are_refused_saying_why(fake_trtllm: Any) -> None:
    """TensorRT-LLM's prompt logprobs lack the prompt tokens' own values: a 400 that says so,
    before the engine is asked (echo with 0 tokens included)."""
    from dynamo_trtllm.handlers import TrtllmHandler

    handler = TrtllmHandler(new_llm(fake_trtllm))
    for max_tokens in (0, 4):
        req = make_request(PROMPT, max_tokens=max_tokens, prompt_logprobs=0)
        with pytest.raises(InvalidRequestError, match="prompt token's own log-probability"):
            await collect(handler, req)
    assert not handler.engine.running
