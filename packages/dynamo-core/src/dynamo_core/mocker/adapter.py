"""`MockerAdapter`: the mocker's start-up half, as every engine package has one.

`python -m dynamo_core.mocker` (`main.py`) is the recipe every role module follows; what is the
mocker's own is here:

- `__init__` takes the role from `--disaggregation-mode` (agg: `worker`), or `embedding` with
  `--embedding-worker` (which takes neither another mode nor a reply script), and checks,
  before anything exists, that `--model-path` holds a tokenizer and that `--reply-script` reads;
- `start(component)` loads the tokenizer, builds the simulated engine (`MockerEngine`, whose
  vocabulary is the tokenizer's printable tokens), publishes its KV events (through `kv_log`,
  which `main.py` serves as `kv_replay`) and load metrics on the component's event topics, and reports the context length (`--context-length`, else the
  model's config.json, else 2048) and the block size (and for the embedding role, the vectors:
  `--embedding-size`, else config.json's `hidden_size`, else 256; Matryoshka-style
  `dimensions` allowed);
- `handler()` is `MockerHandler`, `MockerPrefillHandler` or `MockerDecodeHandler` by role;
  `embedding_handler()` is `MockerEmbeddingHandler`;
- `close()` stops the engine and its publishers.

The engine, the tokenizer and the handlers are imported in `start`, so `--help` and
`--print-config` never load them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.adapter import EngineAdapter, EngineInfo, Role
from dynamo_core.errors import ConfigError
from dynamo_core.llm.kv_log import KvEventLog

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs
    from dynamo_core.handlers import BaseWorkerHandler
    from dynamo_core.llm.model_card import EmbeddingSpec
    from dynamo_core.mocker.engine import MockerEngine
    from dynamo_core.mocker.handlers import MockerEmbeddingHandler, MockerHandler
    from dynamo_core.mocker.main import MockerConfig
    from dynamo_core.mocker.replies import Replies
    from dynamo_core.mocker.script import ReplyScript
    from dynamo_core.runtime import Component, EventPublisher

__all__ = ["MockerAdapter"]

log = logging.getLogger("dynamo.mocker")

_ROLES: dict[str, Role] = {"agg": "worker", "prefill": "prefill", "decode": "decode"}


def _unprintable_token_ids(tokenizer: Any) -> set[int]:
    """Special tokens, and tokens that are not text on their own (a piece of a multi-byte
    character, or nothing): the mocker never emits them, so its output reads as text."""
    ids = list(range(tokenizer.vocab_size))
    texts = tokenizer.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    bad = {i for i, text in zip(ids, texts, strict=True) if not text or "\ufffd" in text}
    return bad | set(tokenizer.special_token_ids)


def _config_int(model_path: Path, keys: tuple[str, ...]) -> int | None:
    config = model_path / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    for key in keys:
        value = data.get(key)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _context_length(model_path: Path) -> int | None:
    return _config_int(
        model_path, ("max_position_embeddings", "max_sequence_length", "n_positions")
    )


class MockerAdapter(EngineAdapter["MockerConfig"]):
    """A simulated engine for a mocker worker (see the module docstring)."""

    def __init__(self, args: ParsedArgs[MockerConfig]) -> None:
        config = args.config
        if config.embedding_worker and (
            config.disaggregation_mode != "agg" or config.reply_script is not None
        ):
            raise ConfigError(
                "--embedding-worker serves vectors: it takes no --disaggregation-mode "
                f"{config.disaggregation_mode} and no --reply-script"
            )
        role: Role = "embedding" if config.embedding_worker else _ROLES[config.disaggregation_mode]
        super().__init__(args, role)
        self.model_dir = config.model_path.resolve()
        if not (self.model_dir / "tokenizer.json").is_file():
            raise ConfigError(f"--model-path {config.model_path}: no tokenizer.json in that folder")
        self.script: ReplyScript | None = None
        if config.reply_script is not None:
            from dynamo_core.mocker.script import ReplyScript

            self.script = ReplyScript.load(config.reply_script)
        self.engine: MockerEngine | None = None
        self.replies: Replies | None = None
        self.embedding: EmbeddingSpec | None = None
        self.name = "mocker"
        self.kv_publisher: EventPublisher | None = None
        self.kv_log = KvEventLog(self._publish_kv)  # kept for routers that missed some
        self._publishers: list[EventPublisher] = []

    async def start(self, component: Component) -> EngineInfo:
        from dynamo_core.llm.kv import KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC
        from dynamo_core.llm.tokenizer import Tokenizer
        from dynamo_core.mocker.engine import MockerEngine, MockerEngineArgs
        from dynamo_core.mocker.replies import Replies

        config = self.config
        self.name = component.name
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, self.model_dir)
        self.replies = Replies.for_model(tokenizer, self.script, seed=config.seed)
        context_length = (
            config.context_length
            or await asyncio.to_thread(_context_length, self.model_dir)
            or 2048
        )
        engine = MockerEngine(
            MockerEngineArgs(
                block_size=config.block_size,
                num_gpu_blocks=config.num_gpu_blocks,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                enable_prefix_caching=config.enable_prefix_caching,
                speedup_ratio=config.speedup_ratio,
                context_length=context_length,
                seed=config.seed,
                mean_output_tokens=config.mean_output_tokens,
            ),
            vocab_size=tokenizer.vocab_size,
            special_token_ids=_unprintable_token_ids(tokenizer),
            name=component.name,
        )
        kv_events = self.kv_publisher = await component.event_publisher(KV_EVENTS_TOPIC)
        self._publishers.append(kv_events)
        load_metrics = await component.event_publisher(LOAD_METRICS_TOPIC)
        self._publishers.append(load_metrics)
        engine.on_kv_events = self.kv_log.publish
        engine.on_load_metrics = lambda event: load_metrics.publish(msgspec.to_builtins(event))
        engine.start()
        self.engine = engine
        if self.role == "embedding":
            self.embedding = await asyncio.to_thread(self._embedding_spec)
        log.info(
            "mocker %s: %s mode, %d blocks of %d tokens, speedup x%g",
            f"{config.namespace}.{component.name}.{config.endpoint}",
            "embedding" if self.embedding else config.disaggregation_mode,
            config.num_gpu_blocks,
            config.block_size,
            config.speedup_ratio,
        )
        return EngineInfo(
            context_length=context_length,
            kv_block_size=config.block_size,
            model_dir=self.model_dir,
            served_name=config.model_name,
            aliases=(str(config.model_path),),
            embedding=self.embedding,
        )

    def _embedding_spec(self) -> EmbeddingSpec:
        from dynamo_core.llm.model_card import EmbeddingSpec

        size = self.config.embedding_size or _config_int(self.model_dir, ("hidden_size", "d_model"))
        return EmbeddingSpec(size=size or 256, matryoshka=True)  # it truncates, renormalises

    def _publish_kv(self, wire: Any) -> None:
        if self.kv_publisher is not None:
            self.kv_publisher.publish(wire)

    def handler(self, cls: type[BaseWorkerHandler] | None = None) -> MockerHandler:
        from dynamo_core.mocker.handlers import (
            MockerDecodeHandler,
            MockerHandler,
            MockerPrefillHandler,
        )

        if self.engine is None:
            raise RuntimeError("MockerAdapter.handler() before start()")
        return self.handler_class(
            cls, worker=MockerHandler, prefill=MockerPrefillHandler, decode=MockerDecodeHandler
        )(self.engine, replies=self.replies, name=f"dynamo.mocker.{self.name}")

    def embedding_handler(self) -> MockerEmbeddingHandler:
        from dynamo_core.mocker.handlers import MockerEmbeddingHandler

        if self.engine is None or self.embedding is None:
            raise RuntimeError(
                "MockerAdapter.embedding_handler() before start() of an embedding role"
            )
        return MockerEmbeddingHandler(
            self.engine,
            spec=self.embedding,
            seed=self.config.seed,
            name=f"dynamo.mocker.{self.name}",
        )

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.close()
        publishers, self._publishers = self._publishers, []
        for publisher in publishers:
            await publisher.close()
