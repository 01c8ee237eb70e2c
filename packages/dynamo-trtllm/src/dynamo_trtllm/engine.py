"""`TrtllmAdapter`: TensorRT-LLM's start-up half of every role (`worker`, `prefill`, `decode`).

The role modules show the runtime calls (component, `create_service`, `register_model`,
`serve_endpoint`); what is TensorRT-LLM's is here:

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
- `start_publisher` re-publishes the engine's KV events and load metrics
  (`dynamo_trtllm.publisher`) unless `--no-publish-events-and-metrics`.

`TrtllmAdapter(args, role)` reads the `--extra-engine-args` file at once (a bad one is one line
before anything starts); `start(component)` is the above, `handler(cls)` the role's handler on
the LLM, `close()` stops the publisher and shuts the LLM down, after a failed start too. The MPI
world a multi-GPU engine needs is entered before the runtime starts (`dynamo_trtllm.mpi`, the
role modules' `before_run` hook), not here.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo_core.adapter import EngineAdapter, EngineInfo, Role
from dynamo_core.errors import ConfigError, EngineError
from dynamo_trtllm.args import TrtllmConfig, llm_kwargs

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs
    from dynamo_core.handlers import BaseWorkerHandler
    from dynamo_core.runtime import Component
    from dynamo_trtllm.protocols import LLMLike
    from dynamo_trtllm.publisher import EnginePublisher

__all__ = [
    "TrtllmAdapter",
    "context_length",
    "kv_block_size",
    "model_dir",
    "served_model_name",
    "start_llm",
    "start_publisher",
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
    return await _start(config, kwargs, file_keys)


async def _start(config: TrtllmConfig, kwargs: dict[str, Any], file_keys: set[str]) -> Any:
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


class TrtllmAdapter(EngineAdapter[TrtllmConfig]):
    """TensorRT-LLM for one worker role (see the module docstring)."""

    def __init__(self, args: ParsedArgs[TrtllmConfig], role: Role) -> None:
        super().__init__(args, role)
        self.kwargs, self.file_keys = llm_kwargs(args, role)  # reads --extra-engine-args now
        self.llm: LLMLike | None = None
        self.publisher: EnginePublisher | None = None
        self.name = "trtllm"

    async def start(self, component: Component) -> EngineInfo:
        config = self.config
        self.name = component.name
        self.llm = await _start(config, self.kwargs, self.file_keys)
        block_size = kv_block_size(self.llm, config)
        if config.publish_events_and_metrics:
            self.publisher = await start_publisher(component, self.llm, block_size)
        return EngineInfo(
            context_length=context_length(self.llm, config),
            kv_block_size=block_size,
            model_dir=await asyncio.to_thread(model_dir, config.model_path),
            served_name=served_model_name(config),
        )

    def handler(self, cls: type[BaseWorkerHandler] | None = None) -> BaseWorkerHandler:
        from dynamo_trtllm.handlers import (
            TrtllmDecodeHandler,
            TrtllmHandler,
            TrtllmPrefillHandler,
        )

        if self.llm is None:
            raise RuntimeError("TrtllmAdapter.handler() before start()")
        chosen = self.handler_class(
            cls, worker=TrtllmHandler, prefill=TrtllmPrefillHandler, decode=TrtllmDecodeHandler
        )
        return chosen(self.llm, name=f"dynamo.trtllm.{self.name}")

    async def close(self) -> None:
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            await publisher.close()
        llm, self.llm = self.llm, None
        shutdown = getattr(llm, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown)
