"""Prometheus metrics of the frontend, named as NVIDIA Dynamo's frontend names them.

The histograms are `ModelHistogram`s, not `prometheus_client.Histogram`s: the streaming path
records a batch of tokens that arrived together as one `observe(value, count)` instead of one
call per token, and a series is plain numbers (no lock per observation: the frontend records
from its event loop's thread only; `/metrics` is served by the same loop). What `/metrics`
shows is the same histogram (`_bucket{le=...}`, `_count`, `_sum`), without the OpenMetrics
`_created` series (NVIDIA Dynamo's frontend has none either).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["FrontendMetrics", "ModelHistogram"]

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


class _Series:
    """One model's histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (the tokens of one batch share their gap)."""
        self.counts[bisect.bisect_left(self._bounds, value)] += count
        self.sum += value * count


class ModelHistogram(Collector):
    """A Prometheus histogram labelled by model, registered in `registry` as a collector."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(float(b) for b in buckets if b != math.inf)
        self._series: dict[str, _Series] = {}
        registry.register(self)

    def labels(self, model: str) -> _Series:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _Series(self._bounds)
        return series

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=["model"])]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        edges = [repr(b) for b in self._bounds] + ["+Inf"]  # prometheus_client's `le`s
        for model, series in list(self._series.items()):
            total = 0
            buckets = []
            for edge, count in zip(edges, series.counts, strict=True):
                total += count
                buckets.append((edge, float(total)))
            family.add_metric([model], buckets, series.sum)
        yield family


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        p = "dynamo_frontend_"
        r = self.registry
        self.requests = Counter(
            p + "requests",
            "Requests handled, by model, endpoint, type (stream/unary) and status.",
            ["model", "endpoint", "request_type", "status"],
            registry=r,
        )
        self.inflight = Gauge(
            p + "inflight_requests", "Requests in progress.", ["model"], registry=r
        )
        self.ttft = ModelHistogram(
            p + "time_to_first_token_seconds",
            "Time from receiving a request to its first token.",
            _LATENCY_BUCKETS,
            r,
        )
        self.itl = ModelHistogram(
            p + "inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            _LATENCY_BUCKETS,
            r,
        )
        self.duration = ModelHistogram(
            p + "request_duration_seconds",
            "Time from receiving a request to its last byte.",
            _LATENCY_BUCKETS,
            r,
        )
        self.input_tokens = ModelHistogram(
            p + "input_sequence_tokens", "Prompt length in tokens.", _TOKEN_BUCKETS, r
        )
        self.output_tokens = ModelHistogram(
            p + "output_sequence_tokens", "Output length in tokens.", _TOKEN_BUCKETS, r
        )

        self.tool_calls = Counter(
            p + "tool_calls",
            "Tool calls parsed from models' output, by model.",
            ["model"],
            registry=r,
        )
        self.structured_requests = Counter(
            p + "structured_output_requests",
            "Requests whose output is constrained, by model and kind (json, json_object, "
            "regex, choice, grammar; tool_choice: a forced tool call).",
            ["model", "kind"],
            registry=r,
        )

    def ended(
        self,
        model: str,
        endpoint: str,
        request_type: str,
        status: str,
        output_tokens: int,
        started: float,
    ) -> None:
        """Record a request that was in flight and has ended (`started`: its monotonic start)."""
        self.inflight.labels(model).dec()
        self.requests.labels(model, endpoint, request_type, status).inc()
        self.output_tokens.labels(model).observe(output_tokens)
        self.duration.labels(model).observe(time.monotonic() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
