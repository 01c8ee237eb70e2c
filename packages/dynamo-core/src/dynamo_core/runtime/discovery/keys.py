"""Where things live in discovery: the key layout, written once.

    v1/instances/{namespace}/{component}/{endpoint}/{instance_id:x}   served endpoints
    v1/models/{namespace}/{model}/{instance_id:x}/{endpoint}          model cards
    v1/events/{namespace}/{component}/{topic}/{instance_id:x}         event publishers

Every reader and writer (the runtime's endpoints, clients and event plane, the model cards,
`dynamo serve`'s readiness watch, tests) builds its keys and prefixes here, so the layout can
only change in one place. The keys are a wire format between processes of different versions
in one graph: a change here is a protocol change.

A `*_prefix(...)` with fewer parts names everything below them (`instances_prefix("demo")`: every
instance of the namespace), always ending in `/` so that `demo` never matches `demo2`. A model
name may hold `/` (`org/model`): it is escaped as `%2F` to keep the key's shape fixed. The
runtime knows the `models` section only as a name; what a model card is lives in
`dynamo_core.llm.model_card`.
"""

from __future__ import annotations

__all__ = [
    "EVENTS",
    "INSTANCES",
    "MODELS",
    "ROOT",
    "event_key",
    "events_prefix",
    "instance_id_of",
    "instance_key",
    "instances_prefix",
    "model_key",
    "model_name_of",
    "models_prefix",
]

ROOT = "v1/"
INSTANCES = f"{ROOT}instances/"
MODELS = f"{ROOT}models/"
EVENTS = f"{ROOT}events/"


def _below(section: str, *parts: str | None) -> str:
    """`section` + the leading given parts, each followed by `/` (stops at the first None)."""
    given: list[str] = []
    for part in parts:
        if part is None:
            break
        given.append(part)
    return section + "".join(f"{p}/" for p in given)


def instances_prefix(
    namespace: str | None = None, component: str | None = None, endpoint: str | None = None
) -> str:
    return _below(INSTANCES, namespace, component, endpoint)


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{instances_prefix(namespace, component, endpoint)}{instance_id:x}"


def events_prefix(
    namespace: str | None = None, component: str | None = None, topic: str | None = None
) -> str:
    return _below(EVENTS, namespace, component, topic)


def event_key(namespace: str, component: str, topic: str, instance_id: int) -> str:
    return f"{events_prefix(namespace, component, topic)}{instance_id:x}"


def models_prefix(namespace: str | None = None) -> str:
    return _below(MODELS, namespace)


def model_key(namespace: str, model: str, instance_id: int, endpoint: str) -> str:
    """One card per (model, instance, endpoint): one process may serve a model on two
    endpoints (a prefill and a decode role in one process)."""
    return f"{models_prefix(namespace)}{model.replace('/', '%2F')}/{instance_id:x}/{endpoint}"


def instance_id_of(key: str) -> int | None:
    """The instance id an instance or event key ends with; None for a key of another shape."""
    try:
        return int(key.rsplit("/", 1)[1], 16)
    except (IndexError, ValueError):
        return None


def model_name_of(key: str) -> str | None:
    """The model a model-card key names (unescaped); None for a key of another shape."""
    if not key.startswith(MODELS):
        return None
    parts = key[len(MODELS) :].split("/")
    return parts[1].replace("%2F", "/") if len(parts) == 4 else None
