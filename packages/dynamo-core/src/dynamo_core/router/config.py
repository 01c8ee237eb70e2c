"""`RouterConfig`: how requests are routed, declared once.

The frontend (`class FrontendConfig(RouterClientConfig, RuntimeConfig)`), `dynamo-run` and the
standalone router (`python -m dynamo_core.router`) compose this one model, so each flag, its
`DYN_*` variable, its YAML key and its `--help` text exist once (help group "Routing"), and
`make_router` (`dynamo_core.router.router`) is the one place that turns them into a router.
`RouterClientConfig` adds what only a frontend chooses: whether a router service decides for it
(`--router-endpoint`), and how long it waits for one (`--router-timeout`).

The modes are declared once, with the policies (`dynamo_core.router.policies.RouterMode`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dynamo_core.router.admission import AdmissionLimits
from dynamo_core.router.policies import RouterMode

__all__ = ["RouterClientConfig", "RouterConfig"]

_GROUP: dict[str, Any] = {"group": "Routing"}


class RouterConfig(BaseModel):
    """Routing and admission settings (what every router, local or remote, is built from)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    router_mode: RouterMode = Field(
        default="round-robin",
        description="How a worker is chosen for each request (kv: the lowest estimated time to "
        "first token, from the prefix each worker has cached, its queued prefill and its load).",
        json_schema_extra=_GROUP,
    )
    kv_overlap_score_weight: float = Field(
        default=1.0,
        ge=0,
        description="With --router-mode kv: weight of the request's own prefill time in the "
        "estimate (1: as measured; more favours cache hits; 0: load only).",
        json_schema_extra=_GROUP,
    )
    router_temperature: float = Field(
        default=0.0,
        ge=0,
        description="With --router-mode kv: softmax temperature over the estimates normalised to "
        "[0, 1] (0: always the best).",
        json_schema_extra=_GROUP,
    )
    router_kv_events: bool = Field(
        default=True,
        description="With --router-mode kv: follow the workers' KV events. "
        "--no-router-kv-events, for engines that publish none: predict what each worker "
        "cached from the prompts sent to it, for --router-ttl-secs.",
        json_schema_extra=_GROUP,
    )
    router_ttl_secs: float = Field(
        default=120.0,
        gt=0,
        description="With --no-router-kv-events: seconds a prompt's blocks count as cached on "
        "the worker it was sent to (each new one renews them).",
        json_schema_extra=_GROUP,
    )
    active_requests_threshold: int | None = Field(
        default=1024,
        gt=0,
        description="A worker with this many requests in flight (counted by this router) is "
        "busy; when every worker of a model is busy, new requests queue, then get 503 with "
        "Retry-After (admission control). none: no limit.",
        json_schema_extra=_GROUP,
    )
    active_decode_blocks_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="A worker whose KV cache is this full (fraction, from its load metrics) is "
        "busy, as with --active-requests-threshold. Default: not checked.",
        json_schema_extra=_GROUP,
    )
    active_prefill_tokens_threshold: int | None = Field(
        default=None,
        gt=0,
        description="A worker with this many prompt tokens sent to it and not yet prefilled "
        "(counted by this router at dispatch: prompts whose first token has not come back; "
        "kv mode: their uncached part) is busy, as with --active-requests-threshold. Default: "
        "not checked.",
        json_schema_extra=_GROUP,
    )
    max_queued_requests: int = Field(
        default=1024,
        ge=0,
        description="Requests that may wait for a worker while all are busy (0: refuse them "
        "at once, 503 with Retry-After: shed instead of queue).",
        json_schema_extra=_GROUP,
    )
    queue_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request may wait for a worker before a 503.",
        json_schema_extra=_GROUP,
    )

    router_replica_sync: bool = Field(
        default=False,
        description="Share the load this router dispatches with the other routers of the same "
        "workers (frontend replicas, the processes of --http-workers, which turn it on), over "
        "the event plane: load-aware modes and admission thresholds count every one's requests.",
        json_schema_extra=_GROUP,
    )

    def admission_limits(self) -> AdmissionLimits:
        """The admission thresholds, as `Admission` takes them."""
        return AdmissionLimits(
            active_requests=self.active_requests_threshold,
            active_decode_blocks=self.active_decode_blocks_threshold,
            active_prefill_tokens=self.active_prefill_tokens_threshold,
            max_queued=self.max_queued_requests,
            queue_timeout=self.queue_timeout,
        )

    def router_settings(self) -> RouterConfig:
        """Only the routing part of a (possibly larger) component config."""
        return RouterConfig.model_validate(
            {name: getattr(self, name) for name in RouterConfig.model_fields}
        )


class RouterClientConfig(RouterConfig):
    """A frontend's routing: `RouterConfig`, and whether a router service decides instead."""

    router_endpoint: str | None = Field(
        default=None,
        description="Ask the router service at this endpoint (python -m dynamo_core.router: "
        "router.route, or namespace.router.route in another namespace) for each request's worker, so "
        "that several frontends share one count of the load and one KV index; the service's "
        "flags decide. While it cannot be reached, requests are routed here, by the flags above.",
        json_schema_extra=_GROUP,
    )
    router_timeout: float = Field(
        default=1.0,
        gt=0,
        description="With --router-endpoint: seconds the router service has to answer before "
        "this frontend routes locally (and keeps doing so for a few seconds).",
        json_schema_extra=_GROUP,
    )

    def router_settings(self) -> RouterClientConfig:
        return RouterClientConfig.model_validate(
            {name: getattr(self, name) for name in RouterClientConfig.model_fields}
        )
