"""Starting vLLM for a Dynamo worker, the part every role shares.

`start_vllm(component, config, engine_args)`:

1. turns on vLLM's KV-events publisher (`KVEventsConfig`, ZMQ), pointed at a local socket the
   worker listens on, unless the user configured one (`--kv-events-config`: the worker then
   follows it) or turned events off (`--no-kv-events`);
2. starts `AsyncLLM.from_engine_args(engine_args, stat_loggers=[...])` in a thread: loading a
   model takes seconds to minutes, during which the event loop keeps the runtime's leases alive;
3. reads what the model card needs from the engine's own config: the context length
   (`model_config.max_model_len`), the KV block size (`cache_config.block_size`), the model's
   generation-config sampling defaults (`model_config.get_diff_sampling_param()`);
4. relays KV events and publishes load metrics on the component's event topics.

The role modules (`worker`, `prefill`, `decode`) call it between `create_service()` and
`register_model(...)`, so those calls stay visible in each role's own `start_engine`.
`VllmWorker` is what `start_engine` returns (`serve()`, `close()`), as `dynamo-run` expects.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dynamo_core.errors import ConfigError, DynamoError, EngineError
from dynamo_core.llm.kv_relay import ZmqKvEventRelay
from dynamo_vllm.events import LoadMetricsLogger

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs
    from dynamo_core.handlers import BaseWorkerHandler
    from dynamo_core.llm.model_card import ModelCard
    from dynamo_core.runtime import Component, DistributedRuntime, Endpoint, EventPublisher
    from dynamo_vllm.args import VllmConfig

Role = Literal["worker", "prefill", "decode"]

__all__ = [
    "VllmEngine",
    "VllmWorker",
    "explain_validation",
    "model_dir",
    "served_model_name",
    "start_error",
    "start_role",
    "start_vllm",
]

log = logging.getLogger("dynamo.vllm")

KV_EVENTS_TOPIC = "kv-events"
_TOKENIZER_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def model_dir(engine_args: Any) -> Path:
    """The folder with the tokenizer files the frontend loads (`--tokenizer`, else `--model`).

    A Hugging Face name resolves to its snapshot in the local cache (vLLM has downloaded it by
    the time this is called), tokenizer files only.
    """
    for candidate in (engine_args.tokenizer, engine_args.model):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    name = engine_args.tokenizer or engine_args.model
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - vLLM depends on it
        raise ConfigError(f"--model {name}: not a folder, and huggingface_hub is missing") from None
    revision = engine_args.tokenizer_revision or engine_args.revision
    return Path(snapshot_download(name, revision=revision, allow_patterns=_TOKENIZER_FILES))


def served_model_name(engine_args: Any) -> str | None:
    """vLLM's `--served-model-name` (its first name); else the Hugging Face name; None for a
    local folder (the card then uses the folder's name)."""
    names = engine_args.served_model_name
    if isinstance(names, list | tuple):
        names = names[0] if names else None
    if names:
        return str(names)
    return None if Path(engine_args.model).is_dir() else str(engine_args.model)


def _kv_event_relay(config: VllmConfig, engine_args: Any, publish: Any) -> ZmqKvEventRelay | None:
    """A relay of vLLM's KV events, with vLLM's publisher pointed at it (unless the user
    configured one with --kv-events-config: then the relay follows that one)."""
    from vllm.config import KVEventsConfig

    if engine_args.enable_prefix_caching is False:
        return None  # no prefix cache, no events worth routing on
    events = engine_args.kv_events_config
    if events is None:
        if not config.kv_events:
            return None
        relay = ZmqKvEventRelay(publish, topic=KV_EVENTS_TOPIC, engine="vLLM")
        engine_args.kv_events_config = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=relay.bind_local(config.kv_events_port),
            topic=KV_EVENTS_TOPIC,
        )
        return relay
    if not events.enable_kv_cache_events or events.publisher != "zmq":
        return None
    relay = ZmqKvEventRelay(publish, topic=str(events.topic or ""), engine="vLLM")
    relay.connect([str(events.endpoint)])
    return relay


@dataclass
class VllmEngine:
    """A started `AsyncLLM` and what Dynamo reads from it."""

    llm: Any
    vllm_config: Any
    context_length: int
    block_size: int
    model_path: Path
    model_name: str | None
    default_sampling: dict[str, Any]
    kv_publisher: EventPublisher
    metrics_publisher: EventPublisher
    kv_relay: ZmqKvEventRelay | None = None

    async def close(self) -> None:
        if self.kv_relay is not None:
            await self.kv_relay.close()
        # on the loop, not in a thread: vLLM's output handler task must not see the engine
        # process go before it is cancelled (it would log a spurious EngineDeadError)
        self.llm.shutdown()
        await self.kv_publisher.close()
        await self.metrics_publisher.close()


async def start_vllm(component: Component, config: VllmConfig, engine_args: Any) -> VllmEngine:
    """Start vLLM for `component` (see the module docstring)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from dynamo_core.llm.kv import KV_EVENTS_TOPIC as DYN_KV_TOPIC
    from dynamo_core.llm.kv import LOAD_METRICS_TOPIC

    kv_publisher: EventPublisher = await component.event_publisher(DYN_KV_TOPIC)
    metrics_publisher: EventPublisher = await component.event_publisher(LOAD_METRICS_TOPIC)
    relay = _kv_event_relay(config, engine_args, kv_publisher.publish)
    metrics = LoadMetricsLogger.factory(metrics_publisher.publish)

    log.info("starting vLLM on %s", engine_args.model)
    try:
        llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, engine_args, stat_loggers=[metrics]
        )
    except Exception as exc:
        log.debug("vLLM failed to start", exc_info=True)
        raise start_error(exc, engine_args.model) from exc
    vllm_config = llm.vllm_config
    model_config = vllm_config.model_config
    block_size = int(vllm_config.cache_config.block_size)
    engine = VllmEngine(
        llm=llm,
        vllm_config=vllm_config,
        context_length=int(model_config.max_model_len),
        block_size=block_size,
        model_path=await asyncio.to_thread(model_dir, engine_args),
        model_name=served_model_name(engine_args),
        default_sampling=dict(model_config.get_diff_sampling_param() or {}),
        kv_publisher=kv_publisher,
        metrics_publisher=metrics_publisher,
        kv_relay=relay,
    )
    if relay is not None:
        relay.start(block_size)
    return engine


@dataclass
class VllmWorker:
    """A role's running worker: engine, handler, endpoint, model card."""

    engine: VllmEngine
    handler: BaseWorkerHandler
    endpoint: Endpoint
    card: ModelCard | None

    async def serve(self) -> None:
        """Serve `generate` until the runtime shuts down."""
        await self.endpoint.serve_endpoint(self.handler.generate)

    async def close(self) -> None:
        await self.engine.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


#: Exception names (anywhere in the chain) meaning "this model cannot be had from here".
_NOT_FOUND = {"LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError"}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _first_sentence(text: str) -> str:
    text = " ".join(text.split()).removeprefix("Value error, ")
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")


def explain_validation(exc: Any) -> str:
    """A pydantic `ValidationError` of vLLM's config classes as one line: the class, and for
    each error the field and the first sentence of vLLM's message (which names the values)."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{field}: " * bool(field) + _first_sentence(str(err.get("msg", ""))))
    return f"{exc.title}: " + "; ".join(parts)


def start_error(exc: BaseException, model: str) -> DynamoError:
    """Why vLLM did not start, in one line. A configuration or a model that is not there
    fails the same way on every restart: those are `ConfigError` (exit status 78, and
    `dynamo serve` stops the graph); anything else stays an `EngineError`."""
    chain = _chain(exc)
    for err in chain:
        if type(err).__name__ == "ValidationError" and hasattr(err, "errors"):
            return ConfigError(f"vLLM cannot start: {explain_validation(err)}")
    if any("Cannot find any model weights" in str(err) for err in chain):
        return ConfigError(
            f"vLLM cannot start: --model {model} holds no weights (*.safetensors); for the "
            "tiny model: python examples/models/make_tiny.py --weights"
        )
    if any(type(err).__name__ in _NOT_FOUND for err in chain):
        return ConfigError(
            f"vLLM cannot start: --model {model} is not a folder here, not in the Hugging Face "
            "cache, and the hub cannot be reached (offline?): give a model folder or download it"
        )
    return EngineError(f"vLLM failed to start: {_first_line(exc)}")


async def start_role(
    runtime: DistributedRuntime,
    parsed: ParsedArgs[VllmConfig],
    role: Role,
    handler_class: Callable[..., BaseWorkerHandler],
) -> VllmWorker:
    """What every role module's `start_engine` does: create the component, start vLLM,
    register the model (a prefill worker as the model's prefill pool); not served yet."""
    from dynamo_core.llm.model_card import register_model
    from dynamo_vllm.args import engine_args

    config = parsed.config
    args = engine_args(parsed)
    if args.kv_transfer_config is None:
        if role == "prefill":
            raise ConfigError(
                "the prefill worker needs a KV connector: --kv-transfer-config "
                '\'{"kv_connector": "NixlConnector", "kv_role": "kv_both"}\''
            )
        if role == "decode":
            log.warning("no --kv-transfer-config: this decode worker can only serve whole requests")
    component = runtime.namespace(config.namespace).component(
        config.resolved_component("prefill" if role == "prefill" else "backend")
    )
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)

    engine = await start_vllm(component, config, args)
    handler = handler_class(
        engine.llm,
        default_sampling=engine.default_sampling,
        name=f"dynamo.vllm.{component.name}",
    )
    card = await register_model(
        endpoint,
        model_path=engine.model_path,
        model_name=engine.model_name,
        aliases=[str(args.model)],  # the --model text, as users will send it
        model_type=["prefill"] if role == "prefill" else None,
        context_length=engine.context_length,
        kv_block_size=engine.block_size,
        migration_limit=config.migration_limit,
        parsers=config.parser_spec(),
    )
    log.info(
        "vllm %s %s: model %s, context length %d, KV block size %d",
        role,
        card.endpoint,
        card.name,
        card.context_length,
        card.kv_block_size,
    )
    return VllmWorker(engine, handler, endpoint, card)
