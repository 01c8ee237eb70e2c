"""Starting and reading an `sglang.Engine`: what the role modules share.

- `start_sglang(server_args)`: `sglang.Engine(server_args=...)`. SGLang must be built on the main
  thread (it installs signal handlers) and on the event loop that will serve it (its tokenizer
  manager binds asyncio ZMQ sockets there), so it runs on the loop and blocks it while the model
  loads; the role modules do it after `create_service()` and before anything is registered (an
  etcd lease that lapses meanwhile is granted again by the runtime).
- `EngineInfo.of(engine)`: what the model card needs, from the engine itself: the context
  length SGLang enforces, its page size (the KV block size), the served name and the folder
  with the tokenizer (a Hugging Face id is looked up in the local cache SGLang loaded it from).
- `bootstrap_address(...)`: where decode workers reach a prefill worker's bootstrap server.
- `make_handler(...)`: the handler class for the disaggregation mode.
- `SglangWorker`: a started worker (`serve()`, `close()`), what `start_engine` returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_core.errors import ConfigError, EngineError
from dynamo_core.llm.kv_relay import ZmqKvEventRelay
from dynamo_core.llm.model_card import ModelCard
from dynamo_core.runtime import Endpoint
from dynamo_sglang.handlers import (
    DecodeHandler,
    PrefillHandler,
    WorkerHandler,
)
from dynamo_sglang.kv_events import LOCAL_TOPIC, local_kv_events_config, subscriber_endpoints

__all__ = [
    "EngineInfo",
    "SglangWorker",
    "bootstrap_address",
    "make_handler",
    "prepare_kv_events",
    "start_sglang",
    "stop_sglang",
]

log = logging.getLogger("dynamo.sglang")


def start_sglang(server_args: Any) -> Any:
    """`sglang.Engine(server_args=server_args)` (blocks while the model loads)."""
    import sglang

    try:
        return sglang.Engine(server_args=server_args)
    except Exception as exc:
        log.debug("SGLang failed to start", exc_info=True)
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise EngineError(f"SGLang failed to start: {detail}") from exc


async def stop_sglang(engine: Any | None, kv_relay: ZmqKvEventRelay | None = None) -> None:
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
class EngineInfo:
    context_length: int
    page_size: int
    model_dir: Path
    served_model_name: str | None
    incremental_output: bool
    dp_size: int
    bootstrap_port: int
    settings: dict[str, Any]

    @classmethod
    def of(cls, engine: Any, *, served_name_given: bool = True) -> EngineInfo:
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


def make_handler(
    engine: Any, mode: str, info: EngineInfo, *, bootstrap_host: str | None, name: str
) -> WorkerHandler:
    if mode == "prefill":
        return PrefillHandler(
            engine,
            bootstrap_host=bootstrap_address(bootstrap_host, info.settings),
            bootstrap_port=info.bootstrap_port,
            incremental_output=info.incremental_output,
            name=name,
        )
    if mode == "decode":
        return DecodeHandler(
            engine, needs_bootstrap=True, incremental_output=info.incremental_output, name=name
        )
    return WorkerHandler(engine, incremental_output=info.incremental_output, name=name)


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
        server_args.kv_events_config = local_kv_events_config(endpoint)
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
    return relay


@dataclass
class SglangWorker:
    """A started SGLang worker: its engine, handler, endpoint and KV-event relay."""

    engine: Any
    handler: WorkerHandler
    endpoint: Endpoint
    card: ModelCard
    kv_relay: ZmqKvEventRelay | None = None

    async def serve(self) -> None:
        await self.endpoint.serve_endpoint(self.handler.generate)

    async def close(self) -> None:
        await stop_sglang(self.engine, self.kv_relay)
