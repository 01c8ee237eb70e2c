"""Routing: policies that pick a worker for each request (round-robin, random, least-loaded)."""

from __future__ import annotations

from dynamo_core.router.policies import (
    LeastLoaded,
    RandomPolicy,
    RoundRobin,
    RouterMode,
    RoutingPolicy,
    make_policy,
)

__all__ = [
    "LeastLoaded",
    "RandomPolicy",
    "RoundRobin",
    "RouterMode",
    "RoutingPolicy",
    "make_policy",
]
