"""`VllmAdapter`: vLLM's start-up half of every role (`worker`, `prefill`, `decode`,
`embedding`).

The role modules show the runtime calls (component, `create_service`, `register_model`,
`serve_endpoint`); what is vLLM's is here:

- `VllmAdapter(args, role)` builds vLLM's `AsyncEngineArgs` from the merged flags and checks
  the role: a prefill worker needs a KV connector (`--kv-transfer-config`), a `ConfigError`
  before any component exists; a decode worker without one only warns (it serves whole
  requests). The embedding role runs vLLM's pooling runner (`--runner pooling`, which converts
  a `*ForCausalLM` model to an embedding model; another runner is a `ConfigError`).
- `start(component)`:
  1. turns on vLLM's KV-events publisher (`KVEventsConfig`, ZMQ), pointed at a local socket the
     worker listens on (core's `ZmqKvEventRelay`, `--kv-events-port`), with a replay socket on
     127.0.0.1 that fills the relay's gaps, unless the user configured one
     (`--kv-events-config`: the relay then follows it, and its `replay_endpoint` if it has one)
     or turned events off (`--no-kv-events`); each data-parallel rank the engine hosts
     publishes on its own port (`dynamo_vllm.kv_events`); the relayed batches are kept in a
     `KvEventLog` served as `kv_replay`, for routers that miss some;
  2. starts `AsyncLLM.from_engine_args(engine_args, stat_loggers=[...])` in a thread: loading a
     model takes seconds to minutes, during which the event loop keeps the runtime's leases
     alive; a failure is one line (`start_error`);
  3. reads what the model card needs from the engine's own config: the context length
     (`model_config.max_model_len`), the KV block size (`cache_config.block_size`), the
     tokenizer folder and served name, and the model's generation-config sampling defaults
     (`model_config.get_diff_sampling_param()`, which the handler applies); for the embedding
     role, its `EmbeddingSpec` (`embedding_size`, `is_matryoshka`, `matryoshka_dimensions`);
  4. relays KV events and publishes load metrics (`LoadMetricsLogger`) on the component's
     event topics.
- `handler(cls)` builds the role's handler on the started `AsyncLLM` (`embedding_handler()`:
  the embedding role's `EmbeddingHandler`).
- `close()` stops the relay, shuts vLLM down on the event loop (its output-handler task must
  not see the engine process go before it is cancelled: that logs a spurious
  `EngineDeadError`) and closes the publishers; after a failed start it releases what exists.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo_core.adapter import EngineAdapter, EngineInfo, Role
from dynamo_core.errors import ConfigError, DynamoError, EngineError
from dynamo_core.llm.kv_log import KvEventLog, serve_replay
from dynamo_vllm.args import engine_args
from dynamo_vllm.events import LoadMetricsLogger
from dynamo_vllm.kv_events import kv_event_relay

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs
    from dynamo_core.handlers import BaseWorkerHandler
    from dynamo_core.llm.kv_relay import ZmqKvEventRelay
    from dynamo_core.llm.model_card import EmbeddingSpec
    from dynamo_core.runtime import Component, EventPublisher
    from dynamo_vllm.args import VllmConfig
    from dynamo_vllm.handlers import EmbeddingHandler
    from dynamo_vllm.protocols import AsyncLLMClass, AsyncLLMLike

__all__ = [
    "VllmAdapter",
    "embedding_spec",
    "explain_validation",
    "model_dir",
    "served_model_name",
    "start_error",
]

log = logging.getLogger("dynamo.vllm")

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


class VllmAdapter(EngineAdapter["VllmConfig"]):
    """vLLM for one worker role (see the module docstring)."""

    def __init__(self, args: ParsedArgs[VllmConfig], role: Role) -> None:
        super().__init__(args, role)
        self.engine_args = engine_args(args)
        if role == "embedding":
            runner = self.engine_args.runner
            if runner not in ("auto", "pooling"):
                raise ConfigError(
                    f"the embedding worker runs vLLM's pooling runner: --runner {runner} "
                    "cannot serve embeddings (leave --runner out, or give pooling)"
                )
            self.engine_args.runner = "pooling"  # a *ForCausalLM model becomes an embedding one
        elif self.engine_args.kv_transfer_config is None:
            if role == "prefill":
                raise ConfigError(
                    "the prefill worker needs a KV connector: --kv-transfer-config "
                    '\'{"kv_connector": "NixlConnector", "kv_role": "kv_both"}\''
                )
            if role == "decode":
                log.warning(
                    "no --kv-transfer-config: this decode worker can only serve whole requests"
                )
        self.llm: AsyncLLMLike | None = None
        self.vllm_config: Any = None
        self.default_sampling: dict[str, Any] = {}
        self.embedding: EmbeddingSpec | None = None
        self.context_length = 0
        self.kv_relay: ZmqKvEventRelay | None = None
        self.name = "vllm"
        self._publishers: list[EventPublisher] = []

    async def start(self, component: Component) -> EngineInfo:
        from vllm.v1.engine.async_llm import AsyncLLM as _AsyncLLM

        engine_class: AsyncLLMClass = _AsyncLLM
        from dynamo_core.llm.kv import KV_EVENTS_TOPIC as DYN_KV_TOPIC
        from dynamo_core.llm.kv import LOAD_METRICS_TOPIC

        self.name = component.name
        args = self.engine_args
        kv_publisher = await component.event_publisher(DYN_KV_TOPIC)
        self._publishers.append(kv_publisher)
        metrics_publisher = await component.event_publisher(LOAD_METRICS_TOPIC)
        self._publishers.append(metrics_publisher)
        kv_log = KvEventLog(kv_publisher.publish)  # kept for routers that miss some
        self.kv_relay = kv_event_relay(self.config, args, kv_log.publish)
        if self.kv_relay is not None:
            await serve_replay(component, kv_log)
        metrics = LoadMetricsLogger.factory(metrics_publisher.publish)

        log.info("starting vLLM on %s", args.model)
        try:
            self.llm = llm = await asyncio.to_thread(
                engine_class.from_engine_args, args, stat_loggers=[metrics]
            )
        except Exception as exc:
            log.debug("vLLM failed to start", exc_info=True)
            raise start_error(exc, args.model) from exc
        self.vllm_config = llm.vllm_config
        model_config = self.vllm_config.model_config
        block_size = int(self.vllm_config.cache_config.block_size)
        self.default_sampling = dict(model_config.get_diff_sampling_param() or {})
        if self.kv_relay is not None:
            self.kv_relay.start(block_size)
        self.context_length = int(model_config.max_model_len)
        if self.role == "embedding":
            self.embedding = embedding_spec(model_config)
        return EngineInfo(
            context_length=self.context_length,
            kv_block_size=block_size,
            model_dir=await asyncio.to_thread(model_dir, args),
            served_name=served_model_name(args),
            aliases=(str(args.model),),  # the --model text, as users will send it
            embedding=self.embedding,
        )

    def handler(self, cls: type[BaseWorkerHandler] | None = None) -> BaseWorkerHandler:
        from dynamo_vllm.handlers import DecodeHandler, PrefillHandler, WorkerHandler

        if self.llm is None:
            raise RuntimeError("VllmAdapter.handler() before start()")
        chosen = (
            cls
            or {
                "worker": WorkerHandler,
                "prefill": PrefillHandler,
                "decode": DecodeHandler,
            }[self.role]
        )
        if not issubclass(chosen, WorkerHandler):
            raise TypeError(f"{chosen.__name__} is not a vLLM handler")
        return chosen(
            self.llm, default_sampling=self.default_sampling, name=f"dynamo.vllm.{self.name}"
        )

    def embedding_handler(self) -> EmbeddingHandler:
        from dynamo_vllm.handlers import EmbeddingHandler

        if self.llm is None or self.embedding is None:
            raise RuntimeError(
                "VllmAdapter.embedding_handler() before start() of an embedding role"
            )
        return EmbeddingHandler(
            self.llm,
            spec=self.embedding,
            name=f"dynamo.vllm.{self.name}",
            context_length=self.context_length,
        )

    async def close(self) -> None:
        relay, self.kv_relay = self.kv_relay, None
        if relay is not None:
            await relay.close()
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()  # on the loop, not in a thread (see the module docstring)
        publishers, self._publishers = self._publishers, []
        for publisher in publishers:
            await publisher.close()


def embedding_spec(model_config: Any) -> EmbeddingSpec:
    """The vectors of a pooling model, as vLLM's model config describes them."""
    from dynamo_core.llm.model_card import EmbeddingSpec

    dims = model_config.matryoshka_dimensions
    return EmbeddingSpec(
        size=int(model_config.embedding_size),
        matryoshka=bool(model_config.is_matryoshka),
        matryoshka_dimensions=[int(d) for d in dims] if dims else None,
    )


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
