"""`tensorrt_llm.llmapi.llm`: `LLM` and `RequestOutput`, faked.

Same signatures and shapes as TensorRT-LLM 1.0's LLM API:

- `LLM(model, tokenizer=None, ..., tensor_parallel_size=1, ..., **kwargs)` validates its
  arguments as `TorchLlmArgs` (pydantic, extra keys forbidden) and keeps them as `llm.args`;
- `llm.generate_async(inputs, sampling_params=None, ..., streaming=False, ...,
  disaggregated_params=None)` returns a `RequestOutput` at once; `async for` over it yields the
  same object, updated, once per step: `outputs[0].token_ids` cumulative, `token_ids_diff` the
  new ones, `finished`, `outputs[0].finish_reason`/`stop_reason`; `abort()` cancels; a failed
  request raises `RequestError` while iterated;
- the end token (`end_id`) and stop tokens end a sequence without being returned
  (`finish_reason="stop"`, `stop_reason` the stop token id, None at the end id);
- `context_only` requests finish after the prompt with one token and
  `outputs[0].disaggregated_params` (first_gen_tokens, ctx_request_id, opaque_state: bytes);
  `generation_only` requests need those (the opaque state must match the prompt: the fake's
  "KV transfer") and return the first token again, then continue;
- `llm.get_kv_cache_events_async(timeout)` / `llm.get_stats_async(timeout)`: async iterables of
  event maps (`{"event_id", "data": {"type": "stored"|"removed"|"created", ...}, "window_size"}`)
  and iteration-stats maps (`kvCacheStats.usedNumBlocks`, ...), when the KV event buffer /
  `enable_iter_perf_stats` are on.

Test hooks (not TensorRT-LLM API): `LLM.instances`, `llm.running` (request ids in flight),
`llm.fail_next` (an exception for the next request), env `FAKE_TRTLLM_STEP_DELAY` (seconds per
step).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import struct
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from hashlib import blake2b
from pathlib import Path
from typing import Any, ClassVar

from tensorrt_llm.disaggregated_params import DisaggregatedParams
from tensorrt_llm.executor import CompletionOutput, Logprob, RequestError
from tensorrt_llm.llmapi.llm_args import TorchLlmArgs
from tensorrt_llm.sampling_params import SamplingParams

_FIRST_TOKEN = 16  # never produce special tokens


def _digest(tokens: list[int]) -> bytes:
    return blake2b(struct.pack(f"<{len(tokens)}I", *tokens), digest_size=16).digest()


def _block_hash(parent: int | None, tokens: list[int]) -> int:
    data = struct.pack("<Q", parent or 0) + struct.pack(f"<{len(tokens)}I", *tokens)
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


class RequestOutput:
    """The output of one request, updated in place while it is iterated."""

    def __init__(
        self,
        llm: LLM,
        request_id: int,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        streaming: bool,
        disaggregated_params: DisaggregatedParams | None,
    ) -> None:
        self._llm = llm
        self.request_id = request_id
        self.prompt = None
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index=0)]
        self.finished = False
        self._sp = sampling_params
        self._streaming = streaming
        self._disagg = disaggregated_params
        self._digest = _digest(prompt_token_ids)
        self._started = False
        self._aborted = False
        self._done = False
        self._fail = llm.fail_next
        llm.fail_next = None

    # -- public API -------------------------------------------------------------------------

    def abort(self) -> None:
        self._aborted = True
        self._llm.running.discard(self.request_id)

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        out = self.outputs[0]
        out._last_token_ids_len = len(out.token_ids)
        out._last_logprobs_len = len(out.logprobs)
        await asyncio.sleep(self._llm.step_delay)
        self._step()
        if self.finished:
            self._done = True
        return self

    async def aresult(self) -> RequestOutput:
        while not self._done:
            await self.__anext__()
        return self

    # -- the fake model ---------------------------------------------------------------------

    def _token(self, pos: int) -> int:
        seed = self._sp.seed or 0
        h = blake2b(self._digest + struct.pack("<qI", seed, pos), digest_size=8).digest()
        return _FIRST_TOKEN + int.from_bytes(h, "little") % (self._llm.vocab_size - _FIRST_TOKEN)

    def _finish(self, reason: str, stop_reason: int | None = None) -> None:
        out = self.outputs[0]
        out.finish_reason = reason  # type: ignore[assignment]
        out.stop_reason = stop_reason
        self.finished = True
        self._llm.running.discard(self.request_id)
        self._llm._stats()

    def _step(self) -> None:
        out = self.outputs[0]
        if self._aborted:
            self._finish("cancelled")
            return
        if not self._started:
            self._started = True
            if self._fail is not None:
                self._llm.running.discard(self.request_id)
                self._done = True
                raise RequestError(str(self._fail))
            kind = self._disagg.request_type if self._disagg is not None else None
            if kind == "generation_only":
                self._receive_kv()
                return
            self._llm._store_prompt(self.prompt_token_ids)
            if kind == "context_only":
                first = self._token(0)
                out.token_ids.append(first)
                out.disaggregated_params = DisaggregatedParams(
                    request_type="context_only",
                    first_gen_tokens=[first],
                    ctx_request_id=self.request_id,
                    opaque_state=self._digest,
                )
                self._finish("length")
                return
        self._generate_one()

    def _receive_kv(self) -> None:
        params = self._disagg
        assert params is not None
        if params.opaque_state != self._digest or not params.first_gen_tokens:
            self._llm.running.discard(self.request_id)
            self._done = True
            raise RequestError("generation_only request: KV cache transfer failed (wrong state)")
        out = self.outputs[0]
        out.token_ids.extend(params.first_gen_tokens)
        self._llm._store_prompt(self.prompt_token_ids)
        if len(out.token_ids) >= self._sp.max_tokens:
            self._finish("length")

    def _generate_one(self) -> None:
        out = self.outputs[0]
        sp = self._sp
        pos = len(out.token_ids)
        tok = self._token(pos)
        past_min = pos + 1 > (sp.min_tokens or 0)
        if past_min and not sp.ignore_eos and sp.end_id is not None and tok == sp.end_id:
            self._finish("stop")
            return
        if past_min and sp.stop_token_ids and tok in sp.stop_token_ids:
            self._finish("stop", tok)
            return
        out.token_ids.append(tok)
        if sp.logprobs:
            alt = _FIRST_TOKEN + (tok + 1 - _FIRST_TOKEN) % (self._llm.vocab_size - _FIRST_TOKEN)
            out.logprobs.append({tok: Logprob(-0.25, 1), alt: Logprob(-1.5, 2)})
        total = len(self.prompt_token_ids) + len(out.token_ids)
        if len(out.token_ids) >= sp.max_tokens or total >= self._llm.args.max_seq_len:
            self._finish("length")


class LLM:
    """`tensorrt_llm.LLM`, faked."""

    instances: ClassVar[list[LLM]] = []

    def __init__(
        self,
        model: str | Path,
        tokenizer: Any = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.args = TorchLlmArgs(
            model=str(model),
            tokenizer=tokenizer,
            tokenizer_mode=tokenizer_mode,
            skip_tokenizer_init=skip_tokenizer_init,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            revision=revision,
            tokenizer_revision=tokenizer_revision,
            **kwargs,
        )
        config: dict[str, Any] = {}
        config_file = Path(model) / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        self.vocab_size = int(config.get("vocab_size", 32000))
        if self.args.max_seq_len is None:
            self.args.max_seq_len = int(config.get("max_position_embeddings", 2048))
        self.kwargs = kwargs
        self.mpi_world_size = int(os.environ.get("tllm_mpi_size", "1"))
        self.step_delay = float(os.environ.get("FAKE_TRTLLM_STEP_DELAY", "0"))
        self.running: set[int] = set()
        self.fail_next: BaseException | None = None
        self.shut_down = False
        self._ids = itertools.count(1)
        kv = self.args.kv_cache_config
        self._block = kv.tokens_per_block
        self._capacity = 64
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._events: deque[dict[str, Any]] = deque(maxlen=max(kv.event_buffer_max_size, 1))
        self._stat_records: deque[dict[str, Any]] = deque(maxlen=1000)
        self._event_id = 0
        if kv.event_buffer_max_size > 0:
            self._event({"type": "created", "num_blocks_per_cache_level": [self._capacity, 0]})
        LLM.instances.append(self)

    def generate_async(
        self,
        inputs: Any,
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: DisaggregatedParams | None = None,
        trace_headers: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        if self.shut_down:
            raise RuntimeError("LLM is shut down")
        if isinstance(inputs, dict):
            tokens = list(inputs["prompt_token_ids"])
        elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            tokens = list(inputs)
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        sp = sampling_params or SamplingParams()
        max_seq = self.args.max_seq_len or 0
        if len(tokens) >= max_seq:
            raise ValueError(
                f"The sum of prompt length ({len(tokens)}) and query length (0) should not "
                f"exceed max_num_tokens ({max_seq})"
            )
        rid = next(self._ids)
        self.running.add(rid)
        if disaggregated_params is not None:
            logging.getLogger("tensorrt_llm").info(
                "%s request %d (%d prompt tokens)",
                disaggregated_params.request_type,
                rid,
                len(tokens),
            )
        return RequestOutput(self, rid, tokens, sp, streaming, disaggregated_params)

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> AsyncIterator[dict[str, Any]]:
        return self._drain(self._events)

    def get_stats_async(self, timeout: float | None = 2) -> AsyncIterator[dict[str, Any]]:
        return self._drain(self._stat_records)

    def shutdown(self) -> None:
        self.shut_down = True

    # -- internals --------------------------------------------------------------------------

    async def _drain(self, queue: deque[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        while queue:
            yield queue.popleft()
        await asyncio.sleep(0)

    def _event(self, data: dict[str, Any]) -> None:
        if self.args.kv_cache_config.event_buffer_max_size <= 0:
            return
        self._events.append({"event_id": self._event_id, "data": data, "window_size": 2048})
        self._event_id += 1

    def _store_prompt(self, tokens: list[int]) -> None:
        blocks: list[dict[str, Any]] = []
        parent: int | None = None
        first_parent: int | None = None
        for start in range(0, len(tokens), self._block):
            chunk = tokens[start : start + self._block]
            h = _block_hash(parent, chunk)
            if h in self._cached:
                self._cached.move_to_end(h)
            else:
                if not blocks:
                    first_parent = parent
                blocks.append(
                    {
                        "type": "stored_block",
                        "block_hash": h,
                        "tokens": [
                            {"type": "unique_token", "token_id": t, "token_extra_id": 0}
                            for t in chunk
                        ],
                        "lora_id": None,
                        "cache_level": 0,
                        "priority": 35,
                    }
                )
                self._cached[h] = None
            parent = h
        if blocks:
            self._event({"type": "stored", "parent_hash": first_parent, "blocks": blocks})
        evicted = []
        while len(self._cached) > self._capacity:
            evicted.append(self._cached.popitem(last=False)[0])
        if evicted:
            self._event({"type": "removed", "block_hashes": evicted})
        self._stats()

    def _stats(self) -> None:
        if not self.args.enable_iter_perf_stats:
            return
        used = len(self._cached)
        self._stat_records.append(
            {
                "iter": len(self._stat_records),
                "numActiveRequests": len(self.running),
                "numQueuedRequests": 0,
                "kvCacheStats": {
                    "maxNumBlocks": self._capacity,
                    "usedNumBlocks": used,
                    "freeNumBlocks": self._capacity - used,
                    "tokensPerBlock": self._block,
                },
            }
        )
