"""`SglangAdapter`: SGLang's start-up half of every role (`worker`, `prefill`, `decode`,
`embedding`).

The role modules show the runtime calls (component, `create_service`, `register_model`,
`serve_endpoint`); what is SGLang's is here:

- `SglangAdapter(args, role)` settles the disaggregation mode (the role module's, or SGLang's
  `--disaggregation-mode` for `dynamo_sglang.worker`; a flag that contradicts the module is a
  `ConfigError` before anything starts) and builds SGLang's `ServerArgs`. The embedding role
  (`dynamo_sglang.embedding`) runs SGLang aggregated with `--is-embedding`.
- `start(component)` sets up the KV-event relay first (core's `ZmqKvEventRelay`; SGLang is
  told where to publish unless `--kv-events-config` says so), then starts
  `sglang.Engine(server_args=...)`. SGLang must be built on the main thread (it installs signal
  handlers) and on the event loop that will serve it (its tokenizer manager binds asyncio ZMQ
  sockets there), so it runs on the loop and blocks it while the model loads (an etcd lease that
  lapses meanwhile is granted again by the runtime). It then reads what the model card needs
  from the engine itself (`SglangSettings.of`): the context length SGLang enforces, its page
  size (the KV block size), the served name and the folder with the tokenizer (a Hugging Face
  id is looked up in the local cache SGLang loaded it from). For the embedding role it also
  reads the vectors' `EmbeddingSpec` from SGLang's model config (`embedding_spec`), and starts
  no KV-event relay (the frontend does not route embeddings by KV cache).
- `handler(cls)`: `WorkerHandler`, `PrefillHandler` (with the bootstrap address decode workers
  dial: `bootstrap_address`) or `DecodeHandler`, by mode; `embedding_handler()`: the embedding
  role's `EmbeddingHandler`.
- `close()` stops the relay and shuts SGLang down (its scheduler and detokenizer processes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dynamo_core.adapter import EngineAdapter, EngineInfo, Role
from dynamo_core.errors import ConfigError, EngineError
from dynamo_core.llm.kv_relay import ZmqKvEventRelay, free_local_port
from dynamo_sglang.args import Mode, resolve_embedding, resolve_mode, server_args_from
from dynamo_sglang.handlers import (
    DecodeHandler,
    EmbeddingHandler,
    PrefillHandler,
    WorkerHandler,
)
from dynamo_sglang.kv_events import (
    LOCAL_TOPIC,
    local_kv_events_config,
    replay_endpoints,
    subscriber_endpoints,
)

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs
    from dynamo_core.handlers import BaseWorkerHandler
    from dynamo_core.llm.model_card import EmbeddingSpec
    from dynamo_core.runtime import Component
    from dynamo_sglang.args import SglangConfig
    from dynamo_sglang.protocols import EngineLike

__all__ = [
    "SglangAdapter",
    "SglangSettings",
    "bootstrap_address",
    "embedding_spec",
    "prepare_kv_events",
    "start_sglang",
    "stop_sglang",
]

log = logging.getLogger("dynamo.sglang")


def start_sglang(server_args: Any) -> EngineLike:
    """`sglang.Engine(server_args=server_args)` (blocks while the model loads)."""
    import sglang

    try:
        engine: EngineLike = sglang.Engine(server_args=server_args)
    except Exception as exc:
        log.debug("SGLang failed to start", exc_info=True)
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise EngineError(f"SGLang failed to start: {detail}") from exc
    return engine


async def stop_sglang(engine: EngineLike | None, kv_relay: ZmqKvEventRelay | None = None) -> None:
    """Stop relaying KV events and shut SGLang down (its scheduler and detokenizer processes)."""
    if kv_relay is not None:
        await kv_relay.close()
    if engine is not None:
        await asyncio.to_thread(engine.shutdown)


def _settings(server_args: Any) -> dict[str, Any]:
    """The engine's resolved settings (SGLang >= 0.5.2x keeps the user's input on the record
    and the resolved values in `resolved_dict()`; earlier releases resolve in place)."""
    resolved = getattr(server_args, "resolved_dict", None)
    if callable(resolved):
        try:
            return dict(resolved())
        except Exception:  # an older or partial record: read the attributes
            log.debug("resolved_dict() failed; reading ServerArgs attributes", exc_info=True)
    return {k: v for k, v in vars(server_args).items() if not k.startswith("_")}


def _model_dir(path: str) -> Path:
    """A folder with tokenizer.json for `path`: the folder itself or its local HF snapshot."""
    local = Path(path).expanduser()
    if (local / "tokenizer.json").is_file():
        return local.resolve()
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(path, local_files_only=True))
    except Exception as exc:
        raise ConfigError(
            f"--model-path {path}: no tokenizer.json in that folder nor in the local "
            f"Hugging Face cache ({type(exc).__name__})"
        ) from None
    if not (cached / "tokenizer.json").is_file():
        raise ConfigError(f"--model-path {path}: the model has no tokenizer.json")
    return cached


@dataclass(frozen=True)
class SglangSettings:
    context_length: int
    page_size: int
    model_dir: Path
    served_model_name: str | None
    incremental_output: bool
    dp_size: int
    bootstrap_port: int
    settings: dict[str, Any]

    @classmethod
    def of(cls, engine: EngineLike, *, served_name_given: bool = True) -> SglangSettings:
        tm = engine.tokenizer_manager
        server_args = getattr(tm, "server_args", None) or engine.server_args
        s = _settings(server_args)
        model_path = str(s.get("model_path"))
        tokenizer = s.get("tokenizer_path") or model_path
        served = s.get("served_model_name") if served_name_given else None
        if served is None and not Path(model_path).expanduser().is_dir():
            served = model_path  # a Hugging Face id names the model
        return cls(
            context_length=int(tm.context_len),
            page_size=int(s.get("page_size") or 1),
            model_dir=_model_dir(str(tokenizer)),
            served_model_name=served,
            incremental_output=bool(
                s.get("incremental_streaming_output") or s.get("stream_output")
            ),
            dp_size=int(s.get("dp_size") or 1),
            bootstrap_port=int(s.get("disaggregation_bootstrap_port") or 8998),
            settings=s,
        )


def bootstrap_address(configured: str | None, settings: dict[str, Any]) -> str:
    """The prefill worker's bootstrap host as decode workers must dial it."""
    if configured:
        return configured
    dist = settings.get("dist_init_addr")
    if dist:
        host = str(dist).rsplit(":", 1)[0].strip("[]")
        return socket.gethostbyname(host)
    try:  # SGLang's own choice (SGLANG_HOST_IP / HOST_IP, then the interfaces)
        from sglang.srt.utils.network import get_local_ip_auto

        return str(get_local_ip_auto("127.0.0.1"))
    except ImportError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def prepare_kv_events(
    server_args: Any, publisher: Any, enabled: bool, port: int = 0
) -> ZmqKvEventRelay | None:
    """A relay of SGLang's KV events to `publisher` (started by the caller once the engine
    runs). Without `--kv-events-config`, SGLang is told to publish to 127.0.0.1:`port` (0: a
    free port), which the relay binds (and the next ports, one per data-parallel rank)."""
    if not enabled:
        return None
    raw = getattr(server_args, "kv_events_config", None)
    dp_size = int(getattr(server_args, "dp_size", None) or 1)
    if not raw:
        relay = ZmqKvEventRelay(publisher.publish, topic=LOCAL_TOPIC, engine="SGLang")
        endpoint = relay.bind_local(port, ranks=dp_size)
        replay = f"tcp://127.0.0.1:{free_local_port(ranks=dp_size)}"  # SGLang binds each rank's
        server_args.kv_events_config = local_kv_events_config(endpoint, replay)
        relay.replays = replay_endpoints({"replay_endpoint": replay}, dp_size)
        return relay
    config = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if config.get("publisher", "null") != "zmq":
        return None
    endpoints, bind = subscriber_endpoints(config, dp_size)
    relay = ZmqKvEventRelay(
        publisher.publish, topic=str(config.get("topic") or ""), engine="SGLang"
    )
    if bind:
        relay.bind(endpoints)
    else:
        relay.connect(endpoints)
    relay.replays = replay_endpoints(config, dp_size)  # the user's replay socket, if any
    return relay


def embedding_spec(model_config: Any, *, takes_dimensions: bool = True) -> EmbeddingSpec:
    """The vectors of an `--is-embedding` model, as SGLang's `ModelConfig` describes them: its
    pooled hidden states, `hidden_size` long (SGLang's own bound on `dimensions`), Matryoshka
    when the HF config says so (`matryoshka_dimensions`, or `is_matryoshka`: any length up to
    the size). `takes_dimensions` False (an SGLang whose `EmbeddingReqInput` has no
    `dimensions`): never shortened, whatever the model is."""
    from dynamo_core.llm.model_card import EmbeddingSpec

    dims = getattr(model_config, "matryoshka_dimensions", None) if takes_dimensions else None
    matryoshka = takes_dimensions and bool(dims or getattr(model_config, "is_matryoshka", False))
    return EmbeddingSpec(
        size=int(model_config.hidden_size),
        matryoshka=matryoshka,
        matryoshka_dimensions=sorted({int(d) for d in dims}) if dims else None,
    )


def _takes_dimensions() -> bool:
    """Whether this SGLang's `EmbeddingReqInput` has `dimensions` (Matryoshka requests)."""
    from sglang.srt.managers.io_struct import EmbeddingReqInput

    return "dimensions" in {f.name for f in dataclasses.fields(EmbeddingReqInput)}


_ROLES: dict[str, Role] = {"null": "worker", "prefill": "prefill", "decode": "decode"}


class SglangAdapter(EngineAdapter["SglangConfig"]):
    """SGLang for one worker role (see the module docstring)."""

    def __init__(
        self,
        args: ParsedArgs[SglangConfig],
        role: Literal["prefill", "decode", "embedding"] | None = None,
    ) -> None:
        """`role` None: as SGLang's `--disaggregation-mode` says (`dynamo_sglang.worker`)."""
        if args.engine_args is None:  # the parser found no SGLang
            from dynamo_sglang import ENGINE

            raise ENGINE.not_installed()
        if role == "embedding":
            mode = resolve_embedding(args)
            super().__init__(args, "embedding")
        else:
            mode = resolve_mode(args, role)
            super().__init__(args, _ROLES[mode])
        self.mode: Mode = mode
        self.server_args = server_args_from(args)
        self.engine: EngineLike | None = None
        self.settings: SglangSettings | None = None
        self.embedding: EmbeddingSpec | None = None
        #: The longest sequence SGLang takes (for an embedding: the longest input).
        self.context_length = 0
        self.kv_relay: ZmqKvEventRelay | None = None
        self.name = "sglang"
        self._publishers: list[Any] = []

    async def start(self, component: Component) -> EngineInfo:
        from dynamo_core.llm.kv import KV_EVENTS_TOPIC
        from dynamo_core.llm.kv_log import KvEventLog, serve_replay

        config = self.config
        self.name = component.name
        publisher = await component.event_publisher(KV_EVENTS_TOPIC)
        self._publishers.append(publisher)
        kv_log = KvEventLog(publisher.publish)  # kept for routers that miss some
        self.kv_relay = prepare_kv_events(
            self.server_args,
            kv_log,
            config.kv_events and self.role != "embedding",
            config.kv_events_port,
        )
        if self.kv_relay is not None:
            await serve_replay(component, kv_log)
        self.engine = start_sglang(self.server_args)  # blocks the loop until SGLang is ready
        served = self.args.engine_sources.get("served_model_name", "default") != "default"
        self.settings = info = SglangSettings.of(self.engine, served_name_given=served)
        if self.kv_relay is not None:
            self.kv_relay.start(info.page_size)
        self.context_length = info.context_length
        kind: str = "aggregated" if self.mode == "null" else self.mode
        if self.role == "embedding":
            self.embedding = embedding_spec(
                self.engine.tokenizer_manager.model_config, takes_dimensions=_takes_dimensions()
            )
            self.context_length -= 1  # SGLang refuses an input as long as its context
            kind = f"embedding (vectors of {self.embedding.size})"
        log.info(
            "sglang %s worker %s: model %s, context %d, page size %d",
            kind,
            f"{config.namespace}.{component.name}.{config.endpoint}",
            info.served_model_name or info.model_dir.name,
            info.context_length,
            info.page_size,
        )
        return EngineInfo(
            context_length=self.context_length,
            kv_block_size=info.page_size,
            model_dir=info.model_dir,
            served_name=info.served_model_name,
            embedding=self.embedding,
        )

    def handler(self, cls: type[BaseWorkerHandler] | None = None) -> BaseWorkerHandler:
        info = self.settings
        if self.engine is None or info is None:
            raise RuntimeError("SglangAdapter.handler() before start()")
        if self.role == "embedding":
            raise RuntimeError("the embedding role's handler is SglangAdapter.embedding_handler()")
        chosen = self.handler_class(
            cls, worker=WorkerHandler, prefill=PrefillHandler, decode=DecodeHandler
        )
        name = f"dynamo.sglang.{self.name}"
        if issubclass(chosen, PrefillHandler):
            prefill = chosen(
                self.engine,
                bootstrap_host=bootstrap_address(self.config.bootstrap_host, info.settings),
                bootstrap_port=info.bootstrap_port,
                incremental_output=info.incremental_output,
                name=name,
            )
            log.info(
                "%s hands out bootstrap %s:%d", name, prefill.bootstrap_host, prefill.bootstrap_port
            )
            return prefill
        return chosen(self.engine, incremental_output=info.incremental_output, name=name)

    def embedding_handler(self) -> EmbeddingHandler:
        if self.engine is None or self.embedding is None:
            raise RuntimeError(
                "SglangAdapter.embedding_handler() before start() of an embedding role"
            )
        return EmbeddingHandler(
            self.engine,
            spec=self.embedding,
            name=f"dynamo.sglang.{self.name}",
            context_length=self.context_length,
        )

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        relay, self.kv_relay = self.kv_relay, None
        await stop_sglang(engine, relay)
        publishers, self._publishers = self._publishers, []
        for publisher in publishers:
            await publisher.close()
