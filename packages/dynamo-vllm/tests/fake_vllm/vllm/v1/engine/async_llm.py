"""`AsyncLLM` (vllm/v1/engine/async_llm.py): the interface dynamo-vllm uses, over a fake engine.

The "model" emits deterministic tokens: a function of the prompt, the seed and the position,
so the same request gives the same tokens. One step every `STEP_S` seconds per request. What
mirrors vLLM:

- `generate(prompt, sampling_params, request_id)` takes `{"prompt_token_ids": [...]}`, yields
  `RequestOutput`s (new tokens only with `RequestOutputKind.DELTA`), ends with `finished=True`;
  `max_tokens` -> "length"; a `stop_token_ids` hit -> "stop" with `stop_reason` (the token is
  in `token_ids`); the model's eos (unless `ignore_eos`, not before `min_tokens`) -> "stop"
  with `stop_reason=None`; `abort(id)` -> a last output with "abort";
- `structured_outputs` is checked as vLLM checks it when the request is added (a
  `VLLMValidationError` for an empty choice list, JSON that does not parse, a bad regex); the
  fake's tokens do not follow it (the handler tests check what reaches the engine);
- logprobs: per token `{token_id: Logprob(logprob, rank)}`, the chosen token plus the top N;
- prompt logprobs (`SamplingParams.prompt_logprobs`, at most the model config's
  `max_logprobs`): `RequestOutput.prompt_logprobs` is None for the first prompt token, then per
  token `{prompt_token: Logprob(logprob, rank), top_1: ..., top_N: ...}` (the prompt token first
  with its own rank, then the N most likely by rank; it is one of them when its rank is <= N),
  sent as the prefill goes (DELTA): prompts longer than `PREFILL_CHUNK` tokens get an output
  without tokens for their first chunk's, then the rest with the first token;
- prefix caching: `num_cached_tokens` counts full blocks seen before; with `kv_events_config`
  the engine publishes `BlockStored` batches through its ZMQ publisher;
- a KV connector (`kv_transfer_config`): `extra_args={"kv_transfer_params":
  {"do_remote_decode": True}}` makes the final output carry `kv_transfer_params`; a request
  with `{"do_remote_prefill": True, ...}` pulls them (`transfers` records it);
- stat loggers: `factory(vllm_config, engine_index)`, then `record(scheduler_stats,
  iteration_stats, mm_cache_stats=None, engine_idx=0)` each step.

- `encode(prompt, pooling_params, request_id)` (a `--runner pooling` engine only, as vLLM's
  input processor checks: "This model does not support pooling" otherwise) verifies the
  `PoolingParams` against the model config (`dimensions`) and, after one step, yields one
  finished `PoolingRequestOutput` whose `outputs.data` is a unit vector of `embedding_size`
  values (or `dimensions`: its prefix, renormalised), a function of the prompt alone.

`requests` holds the running request ids; `fail_next` makes the next `generate` or `encode`
raise.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from array import array
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_events import BlockStored, EventPublisherFactory, KVEventBatch
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import RequestOutputKind, SamplingParams

log = logging.getLogger("vllm.fake")

STEP_S = 0.002
PREFILL_CHUNK = 16
VOCAB = 2315
EOS_TOKEN_ID = 1
FIRST_TOKEN = 10  # generated tokens are >= this: the fake's eos only comes when asked for


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0


def _token(prompt: list[int], seed: int, i: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{prompt}|{i}".encode(), digest_size=8).digest()
    return FIRST_TOKEN + int.from_bytes(digest, "little") % (VOCAB - FIRST_TOKEN)


def _unit_vector(prompt: list[int], size: int, dimensions: int | None) -> array[float]:
    """The fake model's embedding of `prompt`: `size` values from a digest, the first
    `dimensions` of them kept (Matryoshka), normalised."""
    digest = hashlib.shake_256(repr(prompt).encode()).digest(size)
    values = [b - 127.5 for b in digest[: dimensions or size]]
    norm = math.sqrt(sum(v * v for v in values))
    return array("f", [v / norm for v in values])


class AsyncLLM:
    def __init__(self, vllm_config: Any, stat_loggers: list[Any] | None = None) -> None:
        self.vllm_config = vllm_config
        self.vllm_config.cache_config.num_gpu_blocks = 1024
        self.requests: set[str] = set()
        self.aborted: set[str] = set()
        self.fail_next: BaseException | None = None
        self.transfers: list[dict[str, Any]] = []
        self.seen: list[tuple[str, SamplingParams]] = []
        self.engine_id = f"fake-{id(self):x}"
        self.cached_blocks: set[int] = set()
        self.is_shutdown = False
        self.stat_loggers = [f(vllm_config, 0) for f in stat_loggers or []]
        for logger in self.stat_loggers:
            logger.log_engine_initialized()
        # one engine core, data-parallel rank 0 (the scheduler makes its publisher this way)
        self.publisher = EventPublisherFactory.create(vllm_config.kv_events_config, 0)

    @classmethod
    def from_engine_args(
        cls,
        engine_args: Any,
        start_engine_loop: bool = True,
        usage_context: Any = None,
        stat_loggers: list[Any] | None = None,
    ) -> AsyncLLM:
        return cls(engine_args.create_engine_config(usage_context), stat_loggers)

    # -- the fake engine -------------------------------------------------------------------

    def _cache(self, prompt: list[int]) -> int:
        """Full prompt blocks already cached (in tokens); stores and publishes the new ones."""
        size = self.vllm_config.cache_config.block_size
        cached, parent, stored, hashes = 0, None, [], []
        for start in range(0, len(prompt) - len(prompt) % size, size):
            block = prompt[start : start + size]
            h = int.from_bytes(hashlib.sha256(repr((parent, block)).encode()).digest()[-8:], "big")
            if h in self.cached_blocks and not stored:
                cached += size
            else:
                if not stored:
                    stored_parent = parent
                stored.extend(block)
                hashes.append(h)
                self.cached_blocks.add(h)
            parent = h
        if hashes and self.publisher is not None:
            event = BlockStored(
                block_hashes=hashes,
                parent_block_hash=stored_parent,
                token_ids=stored,
                block_size=size,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
            self.publisher.publish(KVEventBatch(ts=time.time(), events=[event]))
        return cached

    def _record(self) -> None:
        stats = SchedulerStats(
            num_running_reqs=len(self.requests), kv_cache_usage=len(self.requests) / 1024
        )
        for logger in self.stat_loggers:
            logger.record(scheduler_stats=stats, iteration_stats=None, engine_idx=0)

    def _logprobs(self, token: int, top: int) -> dict[int, Logprob]:
        entry = {token: Logprob(logprob=-0.25, rank=1)}
        for r in range(1, top + 1):
            alt = FIRST_TOKEN + (token + 7 * r) % (VOCAB - FIRST_TOKEN)
            if alt not in entry:
                entry[alt] = Logprob(logprob=-1.0 - r, rank=r + 1)
        return entry

    def _prompt_logprobs(self, prompt: list[int], top: int) -> list[dict[int, Logprob] | None]:
        """vLLM's `prompt_logprobs` for `prompt` (a function of each token's prefix)."""
        out: list[dict[int, Logprob] | None] = [None]
        for p in range(1, len(prompt)):
            token = prompt[p]
            digest = hashlib.blake2b(repr(prompt[: p + 1]).encode(), digest_size=8).digest()
            rank = 1 + digest[0] % 4  # sometimes among the top N, sometimes not
            ranks = [rank, *range(1, top + 1)]
            ids = [token]
            for r in range(1, top + 1):
                alt = FIRST_TOKEN + (token + 11 * r) % (VOCAB - FIRST_TOKEN)
                ids.append(token if r == rank else alt if alt != token else alt + 1)
            # vLLM's map: a comprehension over (token, top...): the token once, first
            out.append(
                {t: Logprob(logprob=-0.5 * r, rank=r) for t, r in zip(ids, ranks, strict=True)}
            )
        return out

    def _check_prompt(self, prompt: Any) -> None:
        """What every request meets first: a live engine, `fail_next`, a TokensPrompt."""
        if self.is_shutdown:
            raise RuntimeError("EngineDeadError: engine is shut down")
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
            raise TypeError("this fake takes TokensPrompt dicts only")

    # -- the AsyncLLM interface ------------------------------------------------------------

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        self._check_prompt(prompt)
        tokens_in = list(prompt["prompt_token_ids"])
        params = sampling_params
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id} already running.")
        self.seen.append((request_id, params))
        if params.structured_outputs is not None:
            params.structured_outputs.validate()
        max_model_len = self.vllm_config.model_config.max_model_len
        max_logprobs = self.vllm_config.model_config.max_logprobs
        if params.prompt_logprobs is not None and params.prompt_logprobs > max_logprobs:
            raise VLLMValidationError(
                f"Requested prompt logprobs of {params.prompt_logprobs}, which is greater than "
                f"max allowed: {max_logprobs}",
                parameter="prompt_logprobs",
                value=params.prompt_logprobs,
            )
        if len(tokens_in) >= max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(tokens_in)}) is longer than the maximum "
                f"model length of {max_model_len}."
            )
        # vLLM's scheduler ends a sequence at the model length ("length") whatever max_tokens says
        room = max_model_len - len(tokens_in)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        transfer = dict((params.extra_args or {}).get("kv_transfer_params") or {})
        connector = self.vllm_config.kv_transfer_config
        if transfer and connector is None:
            raise ValueError("kv_transfer_params given but no KV connector is configured")
        if transfer.get("do_remote_prefill"):
            self.transfers.append(transfer)
            log.info(
                "fake vllm: request %s pulls its KV cache from %s",
                request_id,
                transfer.get("remote_engine_id"),
            )
        if transfer.get("do_remote_decode"):
            log.info("fake vllm: request %s is prefilled for a remote decode", request_id)
        self.requests.add(request_id)
        seed = params.seed if params.seed is not None else 0
        delta = params.output_kind == RequestOutputKind.DELTA
        produced: list[int] = []
        logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = self._prompt_logprobs(tokens_in, params.prompt_logprobs)
        try:
            cached = self._cache(tokens_in)
            if prompt_lps is not None and len(tokens_in) > PREFILL_CHUNK:
                # chunked prefill: the first chunk's prompt logprobs come on their own
                await asyncio.sleep(STEP_S)
                chunk, prompt_lps = prompt_lps[:PREFILL_CHUNK], prompt_lps[PREFILL_CHUNK:]
                yield self._output(request_id, tokens_in, [], None, None, None, cached, None, chunk)
            i = 0
            while True:
                await asyncio.sleep(STEP_S)
                self._record()
                if request_id in self.aborted:
                    self.aborted.discard(request_id)
                    yield self._output(
                        request_id,
                        tokens_in,
                        [] if delta else produced,
                        None,
                        "abort",
                        None,
                        cached,
                        None,
                    )
                    return
                token = _token(tokens_in, seed, i)
                i += 1
                produced.append(token)
                new_lp = None
                if logprobs is not None:
                    new_lp = [self._logprobs(token, params.logprobs or 0)]
                    logprobs.extend(new_lp)
                reason, stop_reason = None, None
                if params.stop_token_ids and token in params.stop_token_ids:
                    reason, stop_reason = "stop", token
                elif (
                    not params.ignore_eos
                    and token == EOS_TOKEN_ID
                    and len(produced) > params.min_tokens
                ):
                    reason = "stop"
                elif len(produced) >= max_tokens:
                    reason = "length"
                kv_params = None
                if reason is not None and transfer.get("do_remote_decode"):
                    kv_params = {
                        "do_remote_prefill": True,
                        "do_remote_decode": False,
                        "remote_engine_id": self.engine_id,
                        "remote_block_ids": list(range(math.ceil(len(tokens_in) / 16))),
                        "remote_host": "127.0.0.1",
                        "remote_port": 5600,
                        "prompt_tokens": len(tokens_in),
                    }
                yield self._output(
                    request_id,
                    tokens_in,
                    [token] if delta else list(produced),
                    new_lp if delta else logprobs,
                    reason,
                    stop_reason,
                    cached,
                    kv_params,
                    prompt_lps,
                )
                prompt_lps = [] if prompt_lps is not None else None  # DELTA: sent once
                if reason is not None:
                    return
        finally:
            self.requests.discard(request_id)

    def _output(
        self,
        request_id: str,
        prompt: list[int],
        tokens: list[int],
        logprobs: Any,
        reason: str | None,
        stop_reason: int | None,
        cached: int,
        kv_params: dict[str, Any] | None,
        prompt_logprobs: list[dict[int, Logprob] | None] | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request_id,
            prompt=None,
            prompt_token_ids=prompt,
            prompt_logprobs=prompt_logprobs,
            outputs=[
                CompletionOutput(
                    index=0,
                    text="",
                    token_ids=tokens,
                    cumulative_logprob=None,
                    logprobs=logprobs,
                    finish_reason=reason,
                    stop_reason=stop_reason,
                )
            ],
            finished=reason is not None,
            num_cached_tokens=cached,
            kv_transfer_params=kv_params,
        )

    async def encode(
        self,
        prompt: Any,
        pooling_params: PoolingParams,
        request_id: str,
        lora_request: Any = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        tokenization_kwargs: dict[str, Any] | None = None,
        reasoning_ended: bool | None = None,
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        self._check_prompt(prompt)
        model_config = self.vllm_config.model_config
        if model_config.runner_type != "pooling":
            raise VLLMValidationError("This model does not support pooling")
        if pooling_params.task not in ("embed", None):
            raise VLLMValidationError(
                f"Unsupported task: {pooling_params.task!r} Supported tasks: ['embed']"
            )
        pooling_params.verify(model_config)
        tokens_in = list(prompt["prompt_token_ids"])
        if len(tokens_in) > model_config.max_model_len:
            raise VLLMValidationError(
                f"The prompt (length {len(tokens_in)}) is longer than the maximum model length "
                f"of {model_config.max_model_len}."
            )
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id} already running.")
        self.requests.add(request_id)
        try:
            cached = self._cache(tokens_in)
            await asyncio.sleep(STEP_S)
            self._record()
            if request_id in self.aborted:
                self.aborted.discard(request_id)
                return
            vector = _unit_vector(tokens_in, model_config.embedding_size, pooling_params.dimensions)
            yield PoolingRequestOutput(
                request_id=request_id,
                outputs=PoolingOutput(data=vector),
                prompt_token_ids=tokens_in,
                num_cached_tokens=cached,
                finished=True,
            )
        finally:
            self.requests.discard(request_id)

    async def abort(self, request_id: str | list[str], internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if rid in self.requests:
                self.aborted.add(rid)
                self.requests.discard(rid)

    def shutdown(self, timeout: float | None = None) -> None:
        self.is_shutdown = True
        if self.publisher is not None:
            self.publisher.shutdown()
            self.publisher = None
