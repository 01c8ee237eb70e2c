"""vLLM's scheduler stats, re-published on Dynamo's event plane as load metrics.

(vLLM's KV events, the other half of what a KV router reads, come over ZMQ and are relayed by
core's `dynamo_core.llm.kv_relay.ZmqKvEventRelay`: `dynamo_vllm.engine` points vLLM's
`KVEventsConfig` at it.)

**Load metrics.** `LoadMetricsLogger` is a vLLM stat logger (passed to
`AsyncLLM.from_engine_args(stat_loggers=[...])`, called with each step's `SchedulerStats`) that
publishes `LoadMetrics` (running and waiting requests, KV blocks in use of the total) on the
`load_metrics` topic when they change, with the speeds a KV router plans with, measured from each
step's `IterationStats` (`_StepSpeeds`): the decode step is the mean inter-token latency of
steps that finished no prefill; the prefill speed is the prompt tokens computed (cache hits
excluded) over the step time beyond a decode step, both as decaying averages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from dynamo_core.llm.kv import LoadMetrics

__all__ = ["LoadMetricsLogger"]


class _StepSpeeds:
    """Prefill tokens/s and decode step seconds from vLLM's per-step `IterationStats`."""

    DECAY = 0.9  # weight of the past in each decaying sum (about the last 10 steps)

    def __init__(self) -> None:
        self.step_s = 0.0
        self._tokens = 0.0
        self._prefill_s = 0.0
        self._last_at: float | None = None

    def observe(self, stats: Any, busy: bool) -> None:
        """One step's stats; `busy`: the engine had work since the previous step."""
        at = getattr(stats, "iteration_timestamp", None)
        prompt = getattr(stats, "prompt_token_stats", None)
        # prompt tokens computed this step (cache hits excluded where vLLM reports them)
        computed = getattr(prompt, "computed", None) if prompt is not None else None
        if computed is None:
            computed = getattr(stats, "num_prompt_tokens", 0)
        tokens = int(computed or 0)
        itl = getattr(stats, "inter_token_latencies_iter", None) or getattr(
            stats, "time_per_output_tokens_iter", None
        )
        if itl and not tokens:
            mean = sum(itl) / len(itl)
            self.step_s = mean if not self.step_s else 0.8 * self.step_s + 0.2 * mean
        if busy and at is not None and self._last_at is not None:
            extra = max(0.0, at - self._last_at - self.step_s)  # time beyond a decode step
            self._tokens = self._tokens * self.DECAY + tokens
            self._prefill_s = self._prefill_s * self.DECAY + extra
        self._last_at = at

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._tokens / self._prefill_s if self._tokens and self._prefill_s > 0 else 0.0


def _rounded(value: float) -> float | None:
    """3 significant figures (a new report when a speed really changes, not every step); None
    when not measured yet."""
    return float(f"{value:.3g}") if value > 0 else None


class LoadMetricsLogger:
    """A vLLM stat logger (the `StatLoggerBase` interface) that publishes `LoadMetrics`.

    vLLM calls a stat-logger factory as `factory(vllm_config, engine_index)`; use
    `LoadMetricsLogger.factory(publish)` for that.
    """

    def __init__(self, publish: Callable[[Any], None], vllm_config: Any = None) -> None:
        self.publish = publish
        self.vllm_config = vllm_config
        self.last: LoadMetrics | None = None
        self.speeds = _StepSpeeds()
        self._busy = False

    @classmethod
    def factory(cls, publish: Callable[[Any], None]) -> Callable[..., LoadMetricsLogger]:
        def make(vllm_config: Any = None, engine_index: int = 0) -> LoadMetricsLogger:
            return cls(publish, vllm_config)

        return make

    def total_blocks(self) -> int:
        cache = getattr(self.vllm_config, "cache_config", None)
        return int(getattr(cache, "num_gpu_blocks", None) or 0)

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any = None,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if iteration_stats is not None:
            self.speeds.observe(iteration_stats, self._busy)
        if scheduler_stats is None:
            return
        total = self.total_blocks()
        usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)
        running = int(getattr(scheduler_stats, "num_running_reqs", 0))
        waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
        self._busy = bool(running or waiting)
        metrics = LoadMetrics(
            active_blocks=round(usage * total),
            total_blocks=total,
            waiting_requests=waiting,
            running_requests=running,
            prefill_tokens_per_s=_rounded(self.speeds.prefill_tokens_per_s),
            decode_step_ms=_rounded(self.speeds.step_s * 1000),
        )
        if metrics != self.last:
            self.last = metrics
            self.publish(msgspec.to_builtins(metrics))

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
