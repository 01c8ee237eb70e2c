"""Routing: policies that pick a worker for each request (round-robin, random, least-loaded,
and kv: the lowest estimated time to first token, from the workers' KV events and load reports),
and admission control in front of them."""

from __future__ import annotations

from dynamo_core.router.admission import Admission, AdmissionLimits
from dynamo_core.router.indexer import KvIndexer
from dynamo_core.router.kv import KvRouter, WorkerLoad, follow_worker_events
from dynamo_core.router.policies import (
    LeastLoaded,
    RandomPolicy,
    RoundRobin,
    RouterMode,
    RoutingPolicy,
    make_policy,
)

__all__ = [
    "Admission",
    "AdmissionLimits",
    "KvIndexer",
    "KvRouter",
    "LeastLoaded",
    "RandomPolicy",
    "RoundRobin",
    "RouterMode",
    "RoutingPolicy",
    "WorkerLoad",
    "follow_worker_events",
    "make_policy",
]
