"""Prometheus metrics of the frontend, named as NVIDIA Dynamo's frontend names them."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["FrontendMetrics"]

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


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
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from receiving a request to its first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Time from receiving a request to its last byte.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            p + "input_sequence_tokens",
            "Prompt length in tokens.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            p + "output_sequence_tokens",
            "Output length in tokens.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
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
