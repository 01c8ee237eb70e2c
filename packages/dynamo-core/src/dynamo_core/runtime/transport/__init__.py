"""Request planes: `inproc` (one process), `tcp` (the default), `nats` (with a NATS server)."""

from __future__ import annotations

from .base import (
    DEFAULT_WINDOW,
    ClientStream,
    EndpointRegistry,
    HandlerEntry,
    InstanceHealth,
    RequestPlaneClient,
    RequestPlaneServer,
)

__all__ = [
    "DEFAULT_WINDOW",
    "ClientStream",
    "EndpointRegistry",
    "HandlerEntry",
    "InstanceHealth",
    "RequestPlaneClient",
    "RequestPlaneServer",
]
