"""Routing: the one owner of how a request finds its worker.

`RouterConfig` (the flags, declared once) and `make_router` (the one factory) build a `Router`
per pool of workers: a policy (round-robin, random, least-loaded, or kv: the lowest estimated
time to first token, from the workers' KV events and load reports), admission control in front
of it, and the subscription to the workers' events they read (`follow_worker_events`).
"""

from __future__ import annotations

from dynamo_core.router.admission import Admission, AdmissionLimits
from dynamo_core.router.config import RouterConfig
from dynamo_core.router.feed import follow_worker_events
from dynamo_core.router.indexer import KvIndexer
from dynamo_core.router.kv import KvRouter, WorkerLoad
from dynamo_core.router.policies import (
    ROUTER_MODES,
    LeastLoaded,
    RandomPolicy,
    RoundRobin,
    RouterMode,
    RoutingPolicy,
    make_policy,
)
from dynamo_core.router.router import LocalRouter, Route, Router, make_router

__all__ = [
    "ROUTER_MODES",
    "Admission",
    "AdmissionLimits",
    "KvIndexer",
    "KvRouter",
    "LeastLoaded",
    "LocalRouter",
    "RandomPolicy",
    "RoundRobin",
    "Route",
    "Router",
    "RouterConfig",
    "RouterMode",
    "RoutingPolicy",
    "WorkerLoad",
    "follow_worker_events",
    "make_policy",
    "make_router",
]
