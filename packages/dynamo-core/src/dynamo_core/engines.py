"""Engines, found by name through the `dynamo.engines` entry-point group.

Core never imports an engine package: `dynamo_vllm` declares

    [project.entry-points."dynamo.engines"]
    vllm = "dynamo_vllm:ENGINE"

where `ENGINE = EngineSpec(name="vllm", module="dynamo_vllm.worker", extra="dynamo-vllm[vllm]")`.
The module named is the engine's aggregated worker; besides its `main()` it defines

    def build_parser() -> DynFlexibleArgumentParser       # its flags (Dynamo's + the engine's)
    async def start_engine(runtime, parsed) -> EngineWorker

`start_engine` starts the engine, registers the model and prepares the endpoints; the returned
object's `serve()` serves until the runtime shuts down and `close()` releases the engine. The
worker's own `main()` runs the same two calls, so `python -m dynamo_vllm.worker` and
`dynamo-run out=vllm` reach the very same handler classes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Protocol

from dynamo_core.errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "EngineSpec", "EngineWorker", "available_engines", "find_engine"]

ENTRY_POINT_GROUP = "dynamo.engines"


class EngineWorker(Protocol):
    async def serve(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str
    extra: str | None = None
    description: str = ""

    def load(self) -> ModuleType:
        """The worker module (importing it never imports the engine itself)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            hint = f": pip install '{self.extra}'" if self.extra else ""
            raise ConfigError(f"engine {self.name!r} cannot be loaded ({exc}){hint}") from None
        for name in ("build_parser", "start_engine"):
            if not callable(getattr(module, name, None)):
                raise ConfigError(f"engine module {self.module} has no {name}()")
        return module


BUILTIN = {
    "echo": EngineSpec("echo", "dynamo_core.echo", description="streams the prompt back"),
    "mocker": EngineSpec("mocker", "dynamo_core.mocker.main", description="simulated engine"),
}


def available_engines() -> dict[str, EngineSpec]:
    engines = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec: Any = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others
            engines.setdefault(ep.name, EngineSpec(ep.name, ep.value, description=f"broken: {exc}"))
            continue
        if isinstance(spec, EngineSpec):
            engines[ep.name] = spec
    return engines


def find_engine(name: str) -> EngineSpec:
    engines = available_engines()
    spec = engines.get(name)
    if spec is None:
        known = ", ".join(sorted(engines))
        raise ConfigError(
            f"unknown engine {name!r} (known: {known}); engine packages register themselves "
            f"in the {ENTRY_POINT_GROUP!r} entry-point group, e.g. pip install dynamo-vllm"
        )
    return spec
