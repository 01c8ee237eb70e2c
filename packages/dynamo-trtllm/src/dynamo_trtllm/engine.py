"""Starting TensorRT-LLM's engine (`tensorrt_llm.LLM`) and reading back what Dynamo needs.

- `start_llm` builds the LLM from `args.llm_kwargs` in a worker thread (loading weights takes
  minutes; the event loop keeps the runtime's leases alive meanwhile). `kv_cache_config` is
  handed over as a `tensorrt_llm.llmapi.KvCacheConfig`, other nested maps as the plain maps the
  LLM API validates into its config classes.
- A key of `--extra-engine-args` that the engine rejects ends the worker with one line naming
  the key and the file (the LLM API validates its arguments with pydantic, `extra="forbid"`;
  older releases raise `TypeError: unexpected keyword argument`).
- `context_length`, `kv_block_size` and `model_dir` are what the model card needs: the engine's
  real sequence limit, its KV page size, and a local folder with the tokenizer (a Hugging Face id
  is resolved to the cached snapshot, tokenizer files only).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo_core.errors import ConfigError, EngineError
from dynamo_trtllm.args import Role, TrtllmConfig, llm_kwargs

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs
    from dynamo_core.llm.model_card import ModelCard
    from dynamo_core.runtime import Component, DistributedRuntime, Endpoint
    from dynamo_trtllm.handlers import TrtllmHandler
    from dynamo_trtllm.publisher import EnginePublisher

__all__ = [
    "TrtllmWorker",
    "context_length",
    "kv_block_size",
    "model_dir",
    "served_model_name",
    "start_llm",
    "start_publisher",
    "start_role",
]

log = logging.getLogger("dynamo.trtllm")

_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "*.jinja",
]


def _unknown_keys(exc: BaseException, candidates: Iterable[str]) -> list[str]:
    """The argument names an engine error rejects as unknown (dotted for nested ones)."""
    names: list[str] = []
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic.ValidationError
        try:
            for err in errors():
                if err.get("type") == "extra_forbidden":
                    names.append(".".join(str(p) for p in err.get("loc", ())))
        except Exception:  # not pydantic's errors() after all
            names = []
    if not names:
        text = str(exc)
        for pattern in (
            r"unexpected keyword argument '([^']+)'",
            r"[Uu]nknown (?:argument|key|field)s?:? '?([A-Za-z_][\w.]*)'?",
        ):
            names += re.findall(pattern, text)
    known = set(candidates)
    return [n for n in dict.fromkeys(names) if n.split(".")[0] in known or not known]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _reject(keys: list[str], source: str, exc: BaseException) -> ConfigError:
    shown = ", ".join(f"'{k}'" for k in keys)
    noun = "key" if len(keys) == 1 else "keys"
    return ConfigError(
        f"unknown {noun} {shown} in {source}: tensorrt_llm.LLM does not accept "
        f"{'it' if len(keys) == 1 else 'them'} ({_first_line(exc)})"
    )


def _build(kwargs: dict[str, Any], file_keys: set[str], source: str) -> Any:
    import tensorrt_llm
    from tensorrt_llm.llmapi import KvCacheConfig

    kwargs = dict(kwargs)
    kv = kwargs.get("kv_cache_config")
    if isinstance(kv, dict):
        try:
            kwargs["kv_cache_config"] = KvCacheConfig(**kv)
        except Exception as exc:
            keys = [f"kv_cache_config.{k}" for k in _unknown_keys(exc, ())]
            if keys and "kv_cache_config" in file_keys:
                raise _reject(keys, source, exc) from None
            raise ConfigError(f"invalid kv_cache_config ({_first_line(exc)})") from None
    model = kwargs.pop("model")
    try:
        return tensorrt_llm.LLM(model=model, **kwargs)
    except Exception as exc:
        keys = _unknown_keys(exc, file_keys)
        if keys:
            raise _reject(keys, source, exc) from None
        log.debug("TensorRT-LLM failed to start", exc_info=True)
        raise EngineError(f"TensorRT-LLM failed to start: {_first_line(exc)}") from exc


async def start_llm(config: TrtllmConfig, role: Role, parsed: Any = None) -> Any:
    """Create the `tensorrt_llm.LLM` for `config` (a `ParsedArgs` gives flag provenance)."""
    kwargs, file_keys = llm_kwargs(parsed if parsed is not None else config, role)
    source = str(config.extra_engine_args) if config.extra_engine_args else "the engine arguments"
    shown = {k: v for k, v in kwargs.items() if k != "model"}
    log.info("starting TensorRT-LLM: model %s, %s", kwargs["model"], shown)
    return await asyncio.to_thread(_build, kwargs, file_keys, source)


def context_length(llm: Any, config: TrtllmConfig) -> int | None:
    """The engine's real sequence limit (its resolved `max_seq_len`), else the flag's."""
    args = getattr(llm, "args", None)
    value = getattr(args, "max_seq_len", None)
    if isinstance(value, int) and value > 1:
        return value
    return config.max_seq_len


def kv_block_size(llm: Any, config: TrtllmConfig) -> int:
    """Tokens per KV block: the engine's `kv_cache_config.tokens_per_block` where it has one."""
    args = getattr(llm, "args", None)
    kv = getattr(args, "kv_cache_config", None)
    value = getattr(kv, "tokens_per_block", None)
    if isinstance(value, int) and value > 0:
        if value != config.kv_block_size:
            log.warning(
                "--kv-block-size %d differs from the engine's tokens_per_block %d: using %d",
                config.kv_block_size,
                value,
                value,
            )
        return value
    return config.kv_block_size


def model_dir(model: str) -> Path:
    """A local folder with the model's tokenizer files, for the model card."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"--model-path {model}: not a folder, and huggingface_hub (to fetch its tokenizer) "
            "is not installed"
        ) from None
    try:
        return Path(snapshot_download(model, allow_patterns=_TOKENIZER_FILES))
    except Exception as exc:
        raise ConfigError(
            f"--model-path {model}: not a folder, and its tokenizer cannot be fetched ({exc})"
        ) from None


def served_model_name(config: TrtllmConfig) -> str:
    """`--served-model-name`, else the model folder's name or the Hugging Face id as given."""
    if config.served_model_name:
        return config.served_model_name
    path = Path(config.model_path).expanduser()
    return path.resolve().name if path.is_dir() else config.model_path


async def start_publisher(component: Component, llm: Any, block_size: int) -> EnginePublisher:
    """Re-publish the engine's KV events and load metrics on the component's event plane."""
    from dynamo_core.llm.kv import KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC
    from dynamo_trtllm.publisher import EnginePublisher

    publisher = EnginePublisher(
        llm,
        await component.event_publisher(KV_EVENTS_TOPIC),
        await component.event_publisher(LOAD_METRICS_TOPIC),
        block_size,
    )
    publisher.start()
    return publisher


@dataclass
class TrtllmWorker:
    """A started worker: what `dynamo-run` serves and closes (`dynamo_core.engines`)."""

    llm: Any
    handler: TrtllmHandler
    endpoint: Endpoint
    card: ModelCard
    publisher: EnginePublisher | None = None

    async def serve(self) -> None:
        await self.endpoint.serve_endpoint(self.handler.generate)

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.close()
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown)


async def start_role(
    runtime: DistributedRuntime,
    parsed: ParsedArgs[TrtllmConfig],
    role: Role,
    handler_class: type[TrtllmHandler],
) -> TrtllmWorker:
    """What every role module's `start_engine` does: create the component, start the engine,
    register the model (a prefill worker as the model's prefill pool); not served yet."""
    from dynamo_core.llm.model_card import register_model

    config = parsed.config
    name = config.resolved_component(role)
    component = runtime.namespace(config.namespace).component(name)
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)

    llm = await start_llm(config, role, parsed)
    handler = handler_class(llm, name=f"dynamo.trtllm.{name}")
    block_size = kv_block_size(llm, config)
    publisher = None
    if config.publish_events_and_metrics:
        publisher = await start_publisher(component, llm, block_size)
    card = await register_model(
        endpoint,
        model_path=model_dir(config.model_path),
        model_name=served_model_name(config),
        model_type=["prefill"] if role == "prefill" else None,
        context_length=context_length(llm, config),
        kv_block_size=block_size,
        migration_limit=config.migration_limit,
        parsers=config.parser_spec(),
    )
    return TrtllmWorker(llm, handler, endpoint, card, publisher)
