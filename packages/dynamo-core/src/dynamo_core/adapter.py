"""The engine-adapter contract: what a role module asks of its engine package.

Every role module of every engine (`dynamo_vllm.worker`, `dynamo_sglang.decode`, the mocker,
echo, ...) is the same recipe, with the runtime calls in plain sight::

    @dynamo_worker()
    async def worker(runtime: DistributedRuntime, args: ParsedArgs[VllmConfig]) -> None:
        config = args.config
        async with VllmAdapter(args, role="worker") as adapter:
            component = runtime.namespace(config.namespace).component(
                config.resolved_component(adapter.role)
            )
            await component.create_service()
            endpoint = component.endpoint(config.endpoint)
            engine = await adapter.start(component)
            handler = adapter.handler(WorkerHandler)
            await register_model(endpoint, model_path=engine.model_dir, ...)
            await endpoint.serve_endpoint(handler.generate)

and engine specifics live in the package's `EngineAdapter` subclass (its `engine.py`):

- `__init__(args, role)` checks what can be checked without starting anything (a prefill
  worker without a KV connector, a mode that contradicts the module) and raises `ConfigError`
  before any component exists;
- `start(component)` starts the engine for the role, with its KV-event relay and load-metrics
  publisher on the component's event topics, and reports `EngineInfo`: what the model card
  needs (context length, KV block size, model folder, served name, aliases);
- `handler(cls)` builds the role's handler on the started engine (`None`: the class the role
  calls for);
- `embedding_handler()` is the embedding role's handler (a `BaseEmbeddingHandler`), for an
  engine that serves embeddings; `start` then reports the vectors' `EmbeddingSpec` in
  `EngineInfo.embedding`, which the role module puts on the card;
- `close()` releases the engine and its publishers; idempotent, and safe after a failed or
  partial `start` (the `async with` calls it on every way out: a shutdown, a cancellation, an
  error while registering).

`WorkerConfig` holds the flags every worker shares (`--component-name`, `--endpoint`,
`--migration-limit`), declared once. This module imports no engine and nothing heavy: the
handler and component types are for type checking only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar

from pydantic import Field

from dynamo_core.args import ParserFlags, migration_limit_field
from dynamo_core.errors import ConfigError
from dynamo_core.runtime.config import RuntimeConfig

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs
    from dynamo_core.handlers import BaseEmbeddingHandler, BaseWorkerHandler
    from dynamo_core.llm.model_card import EmbeddingSpec
    from dynamo_core.runtime import Component

__all__ = ["EngineAdapter", "EngineInfo", "Role", "WorkerConfig"]

#: What a worker process serves: prefill and decode in one engine, or one half of them; or an
#: embedding model's vectors.
Role = Literal["worker", "prefill", "decode", "embedding"]


class WorkerConfig(RuntimeConfig, ParserFlags):
    """The flags every engine worker has (its config subclasses this); with `ParserFlags`, the
    model's tool-call and reasoning parsers, which `register_model` carries in the card."""

    component_name: str | None = Field(
        default=None,
        description="Component to serve as (default: 'prefill' for a prefill worker, else "
        "'backend'). Named --component-name because --component selects a graph file's section.",
    )
    endpoint: str = Field(default="generate", description="Endpoint that serves token streams.")
    migration_limit: int = migration_limit_field()

    def resolved_component(self, role: str) -> str:
        """The component this worker serves as, for `role`."""
        if self.component_name:
            return self.component_name
        return "prefill" if role == "prefill" else "backend"


@dataclass(frozen=True)
class EngineInfo:
    """What a started engine reports for its model card."""

    #: The longest sequence the engine accepts (prompt plus output); None: the model's config.
    context_length: int | None
    #: Tokens per KV cache block, as the engine pages them (what the KV router hashes).
    kv_block_size: int
    #: A local folder with the tokenizer files the frontend loads.
    model_dir: Path
    #: The name clients send (None: the folder's name).
    served_name: str | None = None
    #: Other names the model answers to (e.g. the `--model` text the engine was started with).
    aliases: tuple[str, ...] = field(default=())
    #: The embedding role's vectors (size, Matryoshka dimensions): the card's `embedding`.
    embedding: EmbeddingSpec | None = None


C = TypeVar("C", bound=WorkerConfig)
H = TypeVar("H", bound="BaseWorkerHandler")


class EngineAdapter(ABC, Generic[C]):
    """An engine package's start-up half (see the module docstring)."""

    def __init__(self, args: ParsedArgs[C], role: Role) -> None:
        self.args = args
        self.config: C = args.config
        self.role: Role = role

    @abstractmethod
    async def start(self, component: Component) -> EngineInfo:
        """Start the engine for this role (and its event relays) on `component`."""

    @abstractmethod
    def handler(self, cls: type[BaseWorkerHandler] | None = None) -> BaseWorkerHandler:
        """The role's handler on the started engine (`cls`: which handler class serves it)."""

    def handler_class(
        self,
        cls: type[BaseWorkerHandler] | None,
        *,
        worker: type[H],
        prefill: type[H],
        decode: type[H],
    ) -> type[H]:
        """`cls`, or this role's class of the three; `TypeError` for a class of another engine
        (one that is not below the `worker` class)."""
        chosen = cls or {"worker": worker, "prefill": prefill, "decode": decode}[self.role]
        if not issubclass(chosen, worker):
            raise TypeError(f"{chosen.__name__} is not a {worker.__name__}")
        return chosen

    def embedding_handler(self) -> BaseEmbeddingHandler:
        """The embedding role's handler on the started engine (an engine that serves
        embeddings overrides it)."""
        raise ConfigError(f"{type(self).__name__} serves no embedding model")

    @abstractmethod
    async def close(self) -> None:
        """Release the engine and its publishers (idempotent, safe after a failed start)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
