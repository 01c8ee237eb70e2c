"""The mocker's engine: continuous batching over a paged KV cache, simulated in pure asyncio.

`MockerEngine` behaves like an inference engine from the outside (requests in, token streams
out, KV events and load metrics published) without computing anything. It exists so that whole
graphs (frontend, router, prefill/decode workers) run and are tested on a CPU, and so that
routing and scheduling ideas can be benchmarked with realistic queueing and cache effects.

The simulation model
--------------------

*Requests and steps.* The engine runs one step loop (an asyncio task). Each request is a sequence
of tokens (prompt, then generated tokens) with `num_computed` of them having KV in the cache. A
step schedules, for each running request, the tokens it still has to compute: many for a
prefill (split into chunks by the token budget), one for a decode. When a step leaves a request
caught up (`num_computed == len(tokens)`) the request "samples" its next token, as vLLM does: a
prefill ends with the first output token, every decode step adds one.

*Scheduling* (`_schedule`), once per step, vLLM-style:

1. running requests first, oldest first, within `max_num_batched_tokens` (a decode costs one
   token of budget, a prefill chunk its length); each needs KV blocks for its new tokens, and
   when there are none left the *newest* running request is preempted (its blocks are freed and
   it goes back to the head of the waiting queue; on re-admission it recomputes prompt plus
   generated tokens, mostly from the prefix cache);
2. then waiting requests, first come first served, while `max_num_seqs` and the budget allow and
   their blocks fit (no admission in a step that preempted). A request that does not fit waits:
   memory pressure queues requests, it never fails them.

*KV blocks* (`kv_cache.KvCache`): `block_size` tokens each, `num_gpu_blocks` in all. On admission
a request's leading full blocks that are already cached (same chained hash,
`dynamo_core.llm.kv.block_hashes`) are shared, ref-counted, and only the rest is prefilled (at
least one token is always computed). Blocks that become full and computed enter the prefix cache
(generated tokens too, so the next turn of a conversation reuses them) and are announced as
`KvStored` events; unreferenced cached blocks are evicted least-recently-released first when
room is needed (`KvRemoved`). With `enable_prefix_caching` off, blocks are private and freed at
the end of the request, and no KV events are emitted.

*Timing* (`TimingModel`): a step takes

    step_ms = step_base_ms                                   (when it runs anything at all)
            + prefill_ms_per_token  * new prefill tokens     (cached tokens cost nothing)
            + decode_ms_per_seq     * decoding requests
            + transfer_ms_per_block * blocks received from a prefill worker

and the loop sleeps `step_ms / 1000 / speedup_ratio` seconds with `asyncio.sleep`. The defaults
are of the order of an 8B model on one modern GPU (about 13k prefill tokens/s, a 4 ms decode
step at small batch growing by 0.05 ms per sequence). Each request's share of simulated time is
recorded (`RequestMetrics.prefill_time_ms`: simulated time of the steps up to its first token),
which makes cache effects measurable independently of the host's speed. The published
`LoadMetrics` carry the model's speeds in wall-clock terms (prefill tokens per second, and the
decode step at the current batch, both scaled by `speedup_ratio`), which is what a KV router
plans with.

*Replies.* A request may come with its answer decided (`output=`: a reply script's text or the
text of a structured-output constraint, as token ids, `dynamo_core.mocker.replies`): the engine
emits those tokens instead of random ones, one per decode step like any others, then its
end-of-sequence token right away (finish reason `eos`; `min_tokens` does not lengthen it, as a
satisfied constraint leaves an engine nothing else to emit), or, without eos ids, it finishes
with `stop`. `max_tokens` and the context still cut it short (`length`).

*Tokens* are deterministic: the token at position `p` is a function of (request seed, or the
engine seed when the request has none; the prompt; `p`), drawn from the model's vocabulary
without its special tokens. The same request therefore yields the same tokens on any mocker,
whether preempted, aggregated, disaggregated or migrated mid-stream (a continuation says how
many of its prompt tokens were generated, `generated`, and is seeded, and its answer length
drawn, from the prompt before them). Fake log-probabilities (the chosen token always the most
likely) are produced on request, for the generated tokens and (`prompt_logprobs`, with the
first output) for the prompt's.

*Answer length.* A chat model answers in a few dozen tokens and then emits an end-of-sequence
token; so does the mocker. A request that names its end-of-sequence tokens (`eos_token_ids`:
the frontend always sends the model's, the handler drops them for `ignore_eos`) gets an answer
length drawn once, from the same seed, from a log-normal distribution around
`mean_output_tokens` (sigma `_LENGTH_SIGMA`, at least `min_tokens`), and its last token is the
first of those ids (finish reason `eos`). `max_tokens` and the context still cut it short
(`length`). Without end-of-sequence ids (engine-level callers, `ignore_eos`, benchmarks) a
request runs to `max_tokens` or the context, as before.

*Disaggregation.* A `prefill_only` request stops after its first token (its blocks stay in the
prefill worker's prefix cache). A `transferred` request (decode side) has its prompt's KV
"received": its uncached prompt blocks cost `transfer_ms_per_block` each instead of prefill time
and no token budget, then it decodes normally.

*Cancellation.* `abort(request_id)` removes the request at once, wherever it is, and frees its
blocks immediately (a step in flight ignores it when it completes).

Everything runs on the event loop: no threads, nothing blocking; state is only touched between
awaits, so KV events are emitted in exactly the order the cache changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from hashlib import blake2b
from typing import Any, Literal

from dynamo_core.errors import InvalidRequestError
from dynamo_core.llm.kv import KvEventBatch, LoadMetrics, block_hashes
from dynamo_core.mocker.kv_cache import KvCache

__all__ = [
    "MockerEngine",
    "MockerEngineArgs",
    "RequestMetrics",
    "StepOutput",
    "TimingModel",
]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_RECENT_METRICS = 1024
_PROMPT_SALT = 0x9A0B_7E11
#: Spread of the answer-length distribution (log-normal): about two thirds of the answers are
#: between half and 1.8 times `mean_output_tokens`.
_LENGTH_SIGMA = 0.6
_UNIT = statistics.NormalDist()

Finish = Literal["eos", "length", "stop", "cancelled", "error"]
_Kind = Literal["prefill", "decode", "transfer"]


@dataclass(frozen=True)
class TimingModel:
    """Simulated cost of one engine step, in milliseconds (before `speedup_ratio`)."""

    step_base_ms: float = 4.0
    """Fixed cost of a forward pass (reading the weights once)."""
    prefill_ms_per_token: float = 0.075
    """Per new (uncached) prompt token computed in the step."""
    decode_ms_per_seq: float = 0.05
    """Per request decoding one token in the step."""
    transfer_ms_per_block: float = 0.01
    """Per KV block received from a prefill worker (disaggregated decode)."""

    def step_ms(self, prefill_tokens: int, decode_seqs: int, transfer_blocks: int = 0) -> float:
        if prefill_tokens == 0 and decode_seqs == 0 and transfer_blocks == 0:
            return 0.0
        return (
            self.step_base_ms
            + self.prefill_ms_per_token * prefill_tokens
            + self.decode_ms_per_seq * decode_seqs
            + self.transfer_ms_per_block * transfer_blocks
        )


@dataclass(frozen=True)
class MockerEngineArgs:
    """The simulated engine's settings (the mocker's flags, minus the runtime's)."""

    block_size: int = 16
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    speedup_ratio: float = 1.0
    context_length: int = 2048
    seed: int = 0
    mean_output_tokens: int = 48
    """Typical answer length of a request that names its end-of-sequence tokens."""
    timing: TimingModel = field(default_factory=TimingModel)
    metrics_interval: float = 0.05
    """Least seconds between two `LoadMetrics` publications while busy."""
    metrics_refresh: float = 1.0
    """Seconds after which unchanged `LoadMetrics` are published again (a router that subscribed
    after the last change learns this worker's load and speeds within that time)."""

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "num_gpu_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "mean_output_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.speedup_ratio <= 0:
            raise ValueError("speedup_ratio must be positive")
        if self.context_length <= 1:
            raise ValueError("context_length must be at least 2")


@dataclass
class RequestMetrics:
    """What one request cost in the simulation."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at (first) admission."""
    prefill_tokens: int = 0
    """Tokens computed as prefill (including recomputation after preemption)."""
    transferred_tokens: int = 0
    """Prompt tokens whose KV came from a prefill worker."""
    output_tokens: int = 0
    preemptions: int = 0
    prefill_time_ms: float = 0.0
    """Simulated time of the steps that ran this request up to its first token."""
    total_time_ms: float = 0.0
    """Simulated time of all the steps that ran this request."""
    queue_wall_s: float = 0.0
    """Wall-clock seconds from arrival to first admission."""
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepOutput:
    """New tokens of one request since the previous output (several steps may be merged)."""

    token_ids: list[int]
    finish_reason: Finish | None = None
    log_probs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_log_probs: list[float | None] | None = None
    """On the first output, when asked for: the prompt's (see `EngineOutput`)."""
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ranks: list[int | None] | None = None
    cached_tokens: int = 0
    metrics: RequestMetrics | None = None


class _Seq:
    """One request inside the engine."""

    __slots__ = (
        "admitted",
        "arrival",
        "eos_at",
        "eos_token",
        "error",
        "generated",
        "hashes",
        "logprobs",
        "match_hashes",
        "match_len",
        "max_tokens",
        "metrics",
        "num_computed",
        "out_finish",
        "out_lp",
        "out_tokens",
        "out_top",
        "private",
        "prompt_len",
        "request_id",
        "script",
        "seed_key",
        "state",
        "tokens",
        "transferred",
        "waiter",
    )

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        seed_key: int,
        logprobs: int | None,
        transferred: bool,
        eos: tuple[int, int] | None = None,
        script: list[int] | None = None,
    ) -> None:
        self.request_id = request_id
        # (answer length, eos token): the `eos_at`-th generated token is `eos_token`
        self.eos_at, self.eos_token = eos if eos is not None else (0, 0)
        self.script = script
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.max_tokens = max_tokens
        self.seed_key = seed_key
        self.logprobs = logprobs
        self.transferred = transferred
        self.num_computed = 0
        self.hashes: list[int] = []  # cached blocks this request references, in order
        self.private = 0  # private blocks it holds
        self.generated = 0
        self.state: Literal["waiting", "running", "done"] = "waiting"
        self.admitted = False
        self.arrival = time.monotonic()
        self.match_hashes: list[int] = []
        self.match_len = -1
        self.metrics = RequestMetrics(request_id=request_id, prompt_tokens=len(prompt))
        self.out_tokens: list[int] = []
        self.out_lp: list[float] = []
        self.out_top: list[list[tuple[int, float]]] = []
        self.out_finish: Finish | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def notify(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_output(self) -> StepOutput:
        out = StepOutput(
            token_ids=self.out_tokens,
            finish_reason=self.out_finish,
            cached_tokens=self.metrics.cached_tokens,
        )
        if self.logprobs is not None:
            out.log_probs, out.top_logprobs = self.out_lp, self.out_top
            self.out_lp, self.out_top = [], []
        self.out_tokens = []
        if self.out_finish is not None:
            out.metrics = self.metrics
        return out


@dataclass
class _Totals:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    preemptions: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    transferred_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    simulated_ms: float = 0.0


def _mix(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash of an integer."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _answer_length(seed_key: int, mean: int, min_tokens: int) -> int:
    """The request's answer length: log-normal around `mean`, drawn from its seed."""
    u = ((_mix(seed_key ^ 0x5EED_1E57) >> 11) + 0.5) / float(1 << 53)  # uniform in (0, 1)
    length = round(mean * math.exp(_LENGTH_SIGMA * _UNIT.inv_cdf(u)))
    return max(1, min_tokens, length)


def _seed_key(seed: int, prompt: list[int]) -> int:
    h = blake2b(digest_size=8)
    h.update(seed.to_bytes(16, "little", signed=True))
    for tok in prompt:
        h.update(tok.to_bytes(4, "little", signed=False))
    return int.from_bytes(h.digest(), "little")


class MockerEngine:
    """A simulated LLM engine. Create it, then `generate(...)` from any coroutine on its loop."""

    def __init__(
        self,
        args: MockerEngineArgs | None = None,
        *,
        vocab_size: int,
        special_token_ids: Iterable[int] = (),
        on_kv_events: Callable[[KvEventBatch], None] | None = None,
        on_load_metrics: Callable[[LoadMetrics], None] | None = None,
        name: str = "mocker",
    ) -> None:
        self.args = args or MockerEngineArgs()
        specials = set(special_token_ids)
        self._vocab = [t for t in range(vocab_size) if t not in specials]
        if not self._vocab:
            raise ValueError("the vocabulary has no ordinary tokens")
        self.cache = KvCache(self.args.num_gpu_blocks, self.args.block_size)
        self.on_kv_events = on_kv_events
        self.on_load_metrics = on_load_metrics
        self.log = logging.getLogger(f"dynamo.mocker.{name}")
        #: Fault injection: raised (once) by the next `generate` call, as an engine error.
        self.fail_next: BaseException | None = None
        self._seqs: dict[str, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._recent: OrderedDict[str, RequestMetrics] = OrderedDict()
        self._totals = _Totals()
        self._event_id = 0
        self._last_metrics: LoadMetrics | None = None
        self._last_metrics_at = -math.inf  # the first metrics go out at once
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop (done on the first request if not called)."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="mocker-step-loop"
            )

    async def close(self) -> None:
        """Stop the loop; requests still in flight end with finish reason `cancelled`."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for rid in list(self._seqs):
            self.abort(rid)

    # -- requests -------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        """Requests the engine holds (waiting or running)."""
        return len(self._seqs)

    async def generate(
        self,
        request_id: str,
        token_ids: list[int],
        *,
        max_tokens: int | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        prefill_only: bool = False,
        transferred: bool = False,
        eos_token_ids: Sequence[int] = (),
        min_tokens: int = 0,
        output: list[int] | None = None,
        generated: int = 0,
        prompt_logprobs: int | None = None,
    ) -> AsyncGenerator[StepOutput, None]:
        """Run a request; yields new tokens as steps produce them, the last with a finish reason.

        With `eos_token_ids`, the answer ends with the first of them after a sampled length
        (never before `min_tokens`); without, it runs to `max_tokens` or the context.
        `output`: the answer's tokens, instead of random ones (then the eos token, or, without
        `eos_token_ids`, finish reason `stop`). `generated`: the last tokens of `token_ids` that
        another engine generated (a migrated request; `output` is then what is left of the
        answer): the sequence goes on exactly as it would have there. `prompt_logprobs`: the
        first output also carries the prompt's fake log-probabilities (`prompt_logprobs`
        alternatives each, see `prompt_logprobs`). Closing the iterator early aborts the
        request (its blocks are freed at once).
        """
        seq = self._add(
            request_id,
            token_ids,
            max_tokens,
            seed,
            logprobs,
            prefill_only,
            transferred,
            eos_token_ids,
            min_tokens,
            output,
            generated,
        )
        loop = asyncio.get_running_loop()
        try:
            while True:
                if seq.error is not None:
                    raise seq.error
                if seq.out_tokens or seq.out_finish is not None:
                    out = seq.take_output()
                    if prompt_logprobs is not None and (
                        out.token_ids or out.finish_reason in ("eos", "stop", "length")
                    ):
                        values, tops, ranks = self.prompt_logprobs(token_ids, prompt_logprobs)
                        out.prompt_log_probs, out.prompt_top_logprobs = values, tops
                        out.prompt_ranks = ranks
                        prompt_logprobs = None
                    yield out
                    if out.finish_reason is not None:
                        return
                    continue
                seq.waiter = loop.create_future()
                try:
                    await seq.waiter
                finally:
                    seq.waiter = None
        finally:
            if seq.state != "done":
                self.abort(request_id)

    def _add(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int | None,
        seed: int | None,
        logprobs: int | None,
        prefill_only: bool,
        transferred: bool,
        eos_token_ids: Sequence[int] = (),
        min_tokens: int = 0,
        output: list[int] | None = None,
        generated: int = 0,
    ) -> _Seq:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        args = self.args
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if len(prompt) >= args.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; the context length is {args.context_length}"
            )
        need = math.ceil((len(prompt) + 1) / args.block_size)
        if need > args.num_gpu_blocks:
            raise InvalidRequestError(
                f"the prompt needs {need} KV blocks; the cache holds {args.num_gpu_blocks}"
            )
        room = args.context_length - len(prompt)
        limit = room if max_tokens is None else min(max_tokens, room)
        if prefill_only:
            limit = min(limit, 1)
        self.start()
        # a continuation is seeded from the original prompt, and its answer length is what is
        # left of the original's (min_tokens arrives reduced by what was generated)
        original = prompt[: len(prompt) - generated] if 0 < generated < len(prompt) else prompt
        key = _seed_key(args.seed if seed is None else seed, original)
        eos = None
        if eos_token_ids:
            # a decided answer ends right after its last token (as a satisfied constraint does)
            if output is not None:
                length = len(output) + 1
            else:
                length = (
                    _answer_length(key, args.mean_output_tokens, min_tokens + generated) - generated
                )
            eos = (max(1, length), eos_token_ids[0])
        seq = _Seq(request_id, prompt, limit, key, logprobs, transferred, eos, output)
        self._totals.requests += 1
        self._seqs[request_id] = seq
        if limit <= 0:
            self._finish(seq, "length")
            return seq
        if output == [] and eos is None:
            self._finish(seq, "stop")  # nothing to say, and no eos token to say it with
            return seq
        self._waiting.append(seq)
        self._kick()
        return seq

    def prompt_logprobs(
        self, prompt: Sequence[int], top: int
    ) -> tuple[list[float | None], list[list[tuple[int, float]]], list[int | None]]:
        """Fake log-probabilities of a prompt's tokens, as `EngineOutput` carries them: each
        a function of the prompt up to it (as a model's are: the same prefix, the same values,
        whatever the seed); each prompt token the most likely at its place (rank 1, as the
        mocker's generated tokens are), then `top` - 1 others, less likely each."""
        vocab = self._vocab
        values: list[float | None] = [None]
        tops: list[list[tuple[int, float]]] = [[]]
        ranks: list[int | None] = [None]
        h = _mix(prompt[0] ^ _PROMPT_SALT)
        for token in prompt[1:]:
            h = _mix(h ^ token)
            lp = -((h >> 32) % 1000) / 1000.0 - 0.001
            alternatives = [(token, lp)] if top else []
            y = h
            for k in range(1, top):
                y = _mix(y)
                alternatives.append((vocab[y % len(vocab)], lp - float(k)))
            values.append(lp)
            tops.append(alternatives)
            ranks.append(1)
        return values, tops, ranks

    def abort(self, request_id: str) -> bool:
        """Drop a request now, freeing its blocks; False if the engine does not hold it."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._totals.cancelled += 1
        self._finish(seq, "cancelled")
        self.log.debug("request %s aborted", request_id)
        self._kick()
        return True

    def cached_tokens(self, request_id: str) -> int | None:
        """Prompt tokens the request found in the prefix cache (live or recently finished)."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            return seq.metrics.cached_tokens
        metrics = self._recent.get(request_id)
        return None if metrics is None else metrics.cached_tokens

    def request_metrics(self, request_id: str) -> RequestMetrics | None:
        """A live or recently finished request's metrics."""
        seq = self._seqs.get(request_id)
        return seq.metrics if seq is not None else self._recent.get(request_id)

    # -- observation ----------------------------------------------------------------------

    @property
    def kv_event_id(self) -> int:
        """Id of the last `KvEventBatch` emitted (0 before the first)."""
        return self._event_id

    def load_metrics(self) -> LoadMetrics:
        """Load now, and the speeds a router plans with (from the timing model, wall-clock)."""
        args, cache = self.args, self.cache
        timing, speedup = args.timing, args.speedup_ratio
        per_token = timing.prefill_ms_per_token
        return LoadMetrics(
            active_blocks=cache.active_blocks,
            total_blocks=cache.capacity,
            waiting_requests=len(self._waiting),
            running_requests=len(self._running),
            cached_blocks=cache.cached_blocks,
            prefill_tokens_per_s=1000.0 * speedup / per_token if per_token > 0 else None,
            decode_step_ms=timing.step_ms(0, max(1, len(self._running))) / speedup,
        )

    def stats(self) -> dict[str, Any]:
        """Counters for tests, dashboards and the `stats` endpoint.

        Blocks: `active` (in use by requests), `cached` (known by hash: what KV events
        describe), `evictable` (cached, unused), `free` (empty), `total`. Requests: `running`,
        `waiting`, and totals `finished` (ended with eos, at their length or at their reply's
        end), `cancelled` (aborted: the caller left, or the handler ended them on a stop
        condition), `failed`. Tokens:
        `prefill_tokens` computed, `cached_tokens` hit at admission, `transferred_tokens`
        received from prefill workers, `output_tokens`. `simulated_ms` is the simulated clock.
        """
        t = self._totals
        cache = self.cache
        return {
            "requests_running": len(self._running),
            "requests_waiting": len(self._waiting),
            "active_blocks": cache.active_blocks,
            "cached_blocks": cache.cached_blocks,
            "evictable_blocks": cache.evictable_blocks,
            "free_blocks": cache.free_blocks,
            "total_blocks": cache.capacity,
            "block_size": cache.block_size,
            "requests_total": t.requests,
            "requests_finished": t.finished,
            "requests_cancelled": t.cancelled,
            "requests_failed": t.failed,
            "preemptions": t.preemptions,
            "prefill_tokens": t.prefill_tokens,
            "cached_tokens": t.cached_tokens,
            "transferred_tokens": t.transferred_tokens,
            "output_tokens": t.output_tokens,
            "evicted_blocks": cache.evicted_total,
            "steps": t.steps,
            "simulated_ms": round(t.simulated_ms, 3),
            "kv_event_id": self._event_id,
        }

    # -- the step loop --------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            if not self._running and not self._waiting:
                self._publish_metrics(force=True)
                wake.clear()
                try:  # idle: wake up now and then to publish the same metrics again
                    async with asyncio.timeout(self.args.metrics_refresh):
                        await wake.wait()
                except TimeoutError:
                    pass
                continue
            try:
                batch = self._schedule()
                self._flush_events()
                if not batch:  # nothing fits now (should not happen): wait for a change
                    wake.clear()
                    try:
                        async with asyncio.timeout(0.05):
                            await wake.wait()
                    except TimeoutError:
                        pass
                    continue
                step_ms = self._step_ms(batch)
                await asyncio.sleep(step_ms / 1000.0 / self.args.speedup_ratio)
                self._apply(batch, step_ms)
                self._flush_events()
                self._publish_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the simulation: fail the requests, keep serving
                self.log.exception("mocker step failed")
                self._fail_all(exc)

    def _schedule(self) -> list[tuple[_Seq, int, _Kind]]:
        args = self.args
        bs = args.block_size
        budget = args.max_num_batched_tokens
        batch: list[tuple[_Seq, int, _Kind]] = []
        preempted = False
        running = self._running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            kind = self._kind(seq)
            todo = len(seq.tokens) - seq.num_computed
            n = todo if kind == "transfer" else min(todo, budget)
            if math.ceil((seq.num_computed + n) / bs) > args.num_gpu_blocks:
                self._finish(seq, "length")  # alone it would not fit: the cache is its limit
                continue
            while not self._reserve(seq, n):
                victim = running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.state != "running":
                break
            batch.append((seq, n, kind))
            if kind != "transfer":
                budget -= n
            i += 1

        waiting = self._waiting
        while waiting and not preempted and budget > 0 and len(running) < args.max_num_seqs:
            seq = waiting[0]
            if not self._admit(seq, budget):
                break
            waiting.popleft()
            seq.state = "running"
            running.append(seq)
            kind = self._kind(seq)
            todo = len(seq.tokens) - seq.num_computed
            n = todo if kind == "transfer" else min(todo, budget)
            batch.append((seq, n, kind))
            if kind != "transfer":
                budget -= n
        return batch

    def _kind(self, seq: _Seq) -> _Kind:
        if seq.transferred and seq.num_computed < seq.prompt_len:
            return "transfer"
        if seq.generated > 0 and seq.num_computed == len(seq.tokens) - 1:
            return "decode"
        return "prefill"

    def _admit(self, seq: _Seq, budget: int) -> bool:
        """Share the cached prefix and reserve blocks for the first chunk; False if no room."""
        bs = self.args.block_size
        cache = self.cache
        hashes: list[int] = []
        if self.args.enable_prefix_caching:
            # at least one token is always computed (its output is the next token)
            usable = (len(seq.tokens) - 1) // bs * bs
            if seq.match_len != usable:
                seq.match_hashes = block_hashes(seq.tokens[:usable], bs)
                seq.match_len = usable
            hashes = seq.match_hashes[: cache.match_prefix(seq.match_hashes)]
        computed = len(hashes) * bs
        todo = len(seq.tokens) - computed
        transfer = seq.transferred and computed < seq.prompt_len
        n = todo if transfer else min(todo, budget)
        need = math.ceil((computed + n) / bs) - len(hashes)
        reclaimed = sum(1 for h in hashes if cache.refs(h) == 0)
        if need > cache.available_blocks - reclaimed:
            return False
        cache.acquire(hashes)
        ok = cache.allocate(need)
        assert ok
        seq.hashes = list(hashes)
        seq.private = need
        seq.num_computed = computed
        if not seq.admitted:
            seq.admitted = True
            seq.metrics.cached_tokens = min(computed, seq.prompt_len)
            seq.metrics.queue_wall_s = time.monotonic() - seq.arrival
            self._totals.cached_tokens += seq.metrics.cached_tokens
        return True

    def _reserve(self, seq: _Seq, n: int) -> bool:
        need = math.ceil((seq.num_computed + n) / self.args.block_size) - (
            len(seq.hashes) + seq.private
        )
        if need <= 0:
            return True
        if not self.cache.allocate(need):
            return False
        seq.private += need
        return True

    def _release(self, seq: _Seq) -> None:
        self.cache.release(seq.hashes)
        self.cache.free(seq.private)
        seq.hashes = []
        seq.private = 0
        seq.num_computed = 0

    def _preempt(self, seq: _Seq) -> None:
        self._running.remove(seq)
        self._release(seq)
        seq.state = "waiting"
        seq.transferred = False  # recomputed here from now on
        seq.metrics.preemptions += 1
        self._totals.preemptions += 1
        self._waiting.appendleft(seq)
        self.log.debug("request %s preempted (out of KV blocks)", seq.request_id)

    def _step_ms(self, batch: list[tuple[_Seq, int, _Kind]]) -> float:
        prefill = decode = transfer = 0
        bs = self.args.block_size
        for seq, n, kind in batch:
            if kind == "prefill":
                prefill += n
            elif kind == "decode":
                decode += 1
            else:
                transfer += math.ceil((seq.num_computed + n) / bs) - seq.num_computed // bs
        return self.args.timing.step_ms(prefill, decode, transfer)

    def _apply(self, batch: list[tuple[_Seq, int, _Kind]], step_ms: float) -> None:
        totals = self._totals
        totals.steps += 1
        totals.simulated_ms += step_ms
        for seq, n, kind in batch:
            if seq.state != "running" or self._seqs.get(seq.request_id) is not seq:
                continue  # aborted while the step ran
            m = seq.metrics
            m.total_time_ms += step_ms
            if seq.generated == 0:
                m.prefill_time_ms += step_ms
            if kind == "prefill":
                m.prefill_tokens += n
                totals.prefill_tokens += n
            elif kind == "transfer":
                m.transferred_tokens += n
                totals.transferred_tokens += n
            seq.num_computed += n
            if self.args.enable_prefix_caching:
                self._commit_full_blocks(seq)
            if seq.num_computed == len(seq.tokens):
                self._sample(seq)

    def _commit_full_blocks(self, seq: _Seq) -> None:
        bs = self.args.block_size
        full = seq.num_computed // bs
        start = len(seq.hashes)
        if full <= start:
            return
        parent = seq.hashes[-1] if seq.hashes else None
        tokens = seq.tokens[start * bs : full * bs]
        new = block_hashes(tokens, bs, parent=parent)
        blocks = [tokens[i : i + bs] for i in range(0, len(tokens), bs)]
        self.cache.commit(parent, new, blocks)
        seq.private -= len(new)
        seq.hashes.extend(new)

    def _sample(self, seq: _Seq) -> None:
        pos = len(seq.tokens)
        x = _mix(seq.seed_key ^ ((pos * _GOLDEN) & _MASK))
        vocab = self._vocab
        eos = seq.generated + 1 == seq.eos_at
        script = seq.script
        if eos:
            token = seq.eos_token
        elif script is not None:
            token = script[seq.generated]
        else:
            token = vocab[x % len(vocab)]
        seq.tokens.append(token)
        seq.generated += 1
        seq.metrics.output_tokens += 1
        self._totals.output_tokens += 1
        seq.out_tokens.append(token)
        if seq.logprobs is not None:
            lp = -((x >> 32) % 1000) / 1000.0 - 0.001
            # the chosen token is the most likely; `logprobs` alternatives in all (0: none)
            top = [(token, lp)] if seq.logprobs else []
            y = x
            for k in range(1, seq.logprobs):
                y = _mix(y)
                top.append((vocab[y % len(vocab)], lp - float(k)))
            seq.out_lp.append(lp)
            seq.out_top.append(top)
        if eos:
            self._finish(seq, "eos")
        elif seq.generated >= seq.max_tokens:
            self._finish(seq, "length")
        elif script is not None and seq.generated >= len(script) and not seq.eos_at:
            self._finish(seq, "stop")
        else:
            seq.notify()

    def _finish(self, seq: _Seq, reason: Finish) -> None:
        if seq.state == "running":
            self._running.remove(seq)
        elif seq.state == "waiting":
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass  # finished before it was queued
        self._release(seq)
        seq.state = "done"
        seq.out_finish = reason
        seq.metrics.finish_reason = reason
        if reason in ("eos", "length", "stop"):
            self._totals.finished += 1
        if self._seqs.get(seq.request_id) is seq:
            del self._seqs[seq.request_id]
        self._recent[seq.request_id] = seq.metrics
        self._recent.move_to_end(seq.request_id)
        while len(self._recent) > _RECENT_METRICS:
            self._recent.popitem(last=False)
        seq.notify()

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self._seqs.values()):
            seq.error = exc
            self._totals.failed += 1
            self._finish(seq, "error")

    # -- publishing -----------------------------------------------------------------------

    def _flush_events(self) -> None:
        events = self.cache.drain_events()
        if not events:
            return
        self._event_id += 1
        if self.on_kv_events is None:
            return
        batch = KvEventBatch(
            event_id=self._event_id, events=events, block_size=self.cache.block_size
        )
        try:
            self.on_kv_events(batch)
        except Exception:
            self.log.exception("publishing KV events failed")

    def _publish_metrics(self, force: bool = False) -> None:
        if self.on_load_metrics is None:
            return
        now = time.monotonic()
        if not force and now - self._last_metrics_at < self.args.metrics_interval:
            return
        metrics = self.load_metrics()
        if (
            metrics == self._last_metrics
            and now - self._last_metrics_at < self.args.metrics_refresh
        ):
            return
        self._last_metrics = metrics
        self._last_metrics_at = now
        try:
            self.on_load_metrics(metrics)
        except Exception:
            self.log.exception("publishing load metrics failed")
