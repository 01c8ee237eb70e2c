"""The distributed runtime: namespaces, components, endpoints, clients, events.

Mirrors NVIDIA Dynamo's Python bindings (`DistributedRuntime`, `dynamo_worker`, `Namespace`,
`Component`, `Endpoint`, `Client`, `Context`). It knows nothing of language models: it moves
requests, response streams and events between processes, over the backends that
`RuntimeConfig` selects (discovery: mem, file, etcd; request plane: inproc, tcp, nats).
"""

from __future__ import annotations

from dynamo_core.runtime._core import (
    Client,
    Component,
    DistributedRuntime,
    Endpoint,
    Instance,
    Namespace,
    ServedEndpoint,
)
from dynamo_core.runtime.config import RuntimeConfig
from dynamo_core.runtime.context import Context
from dynamo_core.runtime.events import Event, EventPublisher, EventSubscriber
from dynamo_core.runtime.logs import configure_logging
from dynamo_core.runtime.transport import ClientStream
from dynamo_core.runtime.worker import dynamo_worker, install_uvloop, run_uvloop

__all__ = [
    "Client",
    "ClientStream",
    "Component",
    "Context",
    "DistributedRuntime",
    "Endpoint",
    "Event",
    "EventPublisher",
    "EventSubscriber",
    "Instance",
    "Namespace",
    "RuntimeConfig",
    "ServedEndpoint",
    "configure_logging",
    "dynamo_worker",
    "install_uvloop",
    "run_uvloop",
]
