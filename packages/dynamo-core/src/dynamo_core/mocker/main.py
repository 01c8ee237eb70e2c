"""`python -m dynamo_core.mocker`: a simulated engine served as a real Dynamo component.

    python -m dynamo_core.mocker --model-path examples/models/tiny --speedup-ratio 10

It registers a model card (in prefill mode, as the model's prefill pool), serves `generate` (token streams, on
`MockerHandler`, `MockerPrefillHandler` or `MockerDecodeHandler` by `--disaggregation-mode`) and
`stats` (engine counters), and publishes KV events and load metrics on the event plane, exactly
as an engine worker does; only the engine is simulated (`dynamo_core.mocker.engine` explains how).

`start_mocker(runtime, config)` does the whole set-up and returns a `MockerWorker` (`serve()`,
`close()`), so that tests and `dynamo-run out=mocker` (through `start_engine(runtime, parsed)`,
the `dynamo_core.engines` hook) run the same component inside their own process. Importing this
module is cheap: the engine, the tokenizer and the LLM layer are imported inside `start_mocker`,
so `--help` and `--print-config` answer at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from pydantic import Field

from dynamo_core.args import (
    DynFlexibleArgumentParser,
    ParsedArgs,
    ParserFlags,
    migration_limit_field,
)
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.errors import ConfigError
from dynamo_core.runtime import (
    Component,
    DistributedRuntime,
    Endpoint,
    EventPublisher,
    RuntimeConfig,
    dynamo_worker,
)

if TYPE_CHECKING:
    from dynamo_core.llm.model_card import ModelCard
    from dynamo_core.mocker.engine import MockerEngine
    from dynamo_core.mocker.handlers import MockerHandler

__all__ = [
    "Deployment",
    "MockerConfig",
    "MockerWorker",
    "build_parser",
    "main",
    "start_engine",
    "start_mocker",
]

DisaggregationMode = Literal["agg", "prefill", "decode"]


class MockerConfig(RuntimeConfig, ParserFlags):
    """The mocker's flags (NVIDIA Dynamo's mocker and vLLM's names where they exist)."""

    model_path: Path = Field(
        description="Model folder holding tokenizer.json (and config.json): the vocabulary the "
        "simulated tokens come from, and the tokenizer the frontend loads."
    )
    model_name: str | None = Field(
        default=None, description="Served model name (default: the model folder's name)."
    )
    component_name: str | None = Field(
        default=None,
        description="Component to serve as (default: 'backend', or 'prefill' in prefill mode). "
        "Named --component-name because --component selects a graph file's section.",
    )
    endpoint: str = Field(default="generate", description="Endpoint that serves token streams.")
    block_size: int = Field(default=16, gt=0, description="Tokens per KV cache block.")
    num_gpu_blocks: int = Field(
        default=16384, gt=0, description="KV cache blocks the simulated GPU holds."
    )
    max_num_seqs: int = Field(default=256, gt=0, description="Most requests running in one batch.")
    max_num_batched_tokens: int = Field(
        default=8192, gt=0, description="Token budget of one step (prefill chunks plus decodes)."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse cached KV blocks across requests with a common prefix."
    )
    speedup_ratio: float = Field(
        default=1.0,
        gt=0,
        description="Run the simulated clock this many times faster than real time.",
    )
    disaggregation_mode: DisaggregationMode = Field(
        default="agg",
        description="agg: prefill and decode here; prefill: process prompts and hand the KV cache to "
        "decode workers; decode: continue requests prefilled elsewhere.",
    )
    context_length: int | None = Field(
        default=None,
        gt=1,
        description="Longest sequence, prompt plus output (default: config.json).",
    )
    migration_limit: int = migration_limit_field()
    seed: int = Field(
        default=0, description="Seed of the generated tokens for requests without one."
    )
    mean_output_tokens: int = Field(
        default=48,
        gt=0,
        description="Typical answer length: each request ends with an end-of-sequence token "
        "after a length drawn from its seed around this value (unless ignore_eos; max_tokens "
        "still cuts it short).",
    )
    reply_script: Path | None = Field(
        default=None,
        description="YAML/JSON list of rules ({when: {user|user_regex|prompt|prompt_regex|"
        "tools: ...}, reply: TEXT}): the first rule matching a request's prompt gives its "
        "reply, word for word (dynamo_core.mocker.script explains the format).",
    )

    def resolved_component(self) -> str:
        if self.component_name:
            return self.component_name
        return "prefill" if self.disaggregation_mode == "prefill" else "backend"


class Deployment(BaseDeployment):
    name = "mocker"
    resources = Resources(gpu=0, cpu="1", memory="1Gi")


def build_parser() -> DynFlexibleArgumentParser[MockerConfig]:
    return DynFlexibleArgumentParser(
        MockerConfig,
        prog="python -m dynamo_core.mocker",
        description="A simulated LLM engine (KV cache, continuous batching, timing, KV events) "
        "served as a Dynamo component: CPU-only graphs, tests and benchmarks.",
    )


@dataclass
class MockerWorker:
    """A running mocker: its engine, handler, endpoints and publishers."""

    config: MockerConfig
    component: Component
    engine: MockerEngine
    handler: MockerHandler
    endpoint: Endpoint
    stats_endpoint: Endpoint
    kv_publisher: EventPublisher
    metrics_publisher: EventPublisher
    card: ModelCard | None

    async def serve(self) -> None:
        """Serve `generate` and `stats` until the runtime shuts down."""
        await asyncio.gather(
            self.endpoint.serve_endpoint(self.handler.generate),
            self.stats_endpoint.serve_endpoint(self.handler.stats),
        )

    async def close(self) -> None:
        await self.engine.close()
        await self.kv_publisher.close()
        await self.metrics_publisher.close()


def _unprintable_token_ids(tokenizer: Any) -> set[int]:
    """Special tokens, and tokens that are not text on their own (a piece of a multi-byte
    character, or nothing): the mocker never emits them, so its output reads as text."""
    ids = list(range(tokenizer.vocab_size))
    texts = tokenizer.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    bad = {i for i, text in zip(ids, texts, strict=True) if not text or "\ufffd" in text}
    return bad | set(tokenizer.special_token_ids)


def _context_length(model_path: Path) -> int | None:
    config = model_path / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions"):
        value = data.get(key)
        if isinstance(value, int) and value > 1:
            return value
    return None


async def start_mocker(runtime: DistributedRuntime, config: MockerConfig) -> MockerWorker:
    """Create the component, the engine and the handler; publish events; register the model.

    Endpoints are not served yet: call `serve()` on the result (or `serve_endpoint` yourself).
    """
    from dynamo_core.llm.kv import KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC
    from dynamo_core.llm.model_card import register_model
    from dynamo_core.llm.tokenizer import Tokenizer
    from dynamo_core.mocker.engine import MockerEngine, MockerEngineArgs
    from dynamo_core.mocker.handlers import (
        MockerDecodeHandler,
        MockerHandler,
        MockerPrefillHandler,
    )
    from dynamo_core.mocker.replies import Replies
    from dynamo_core.mocker.script import ReplyScript

    model_path = config.model_path.resolve()
    if not (model_path / "tokenizer.json").is_file():
        raise ConfigError(f"--model-path {config.model_path}: no tokenizer.json in that folder")
    script = ReplyScript.load(config.reply_script) if config.reply_script else None
    name = config.resolved_component()
    component = runtime.namespace(config.namespace).component(name)
    await component.create_service()

    tokenizer = await asyncio.to_thread(Tokenizer.from_dir, model_path)
    replies = Replies.for_model(tokenizer, script, seed=config.seed)
    context_length = (
        config.context_length or await asyncio.to_thread(_context_length, model_path) or 2048
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
        name=name,
    )

    kv_publisher: EventPublisher = await component.event_publisher(KV_EVENTS_TOPIC)
    metrics_publisher: EventPublisher = await component.event_publisher(LOAD_METRICS_TOPIC)

    def publish(publisher: EventPublisher) -> Any:
        return lambda event: publisher.publish(msgspec.to_builtins(event))

    engine.on_kv_events = publish(kv_publisher)
    engine.on_load_metrics = publish(metrics_publisher)
    engine.start()

    handler_class = {
        "agg": MockerHandler,
        "prefill": MockerPrefillHandler,
        "decode": MockerDecodeHandler,
    }[config.disaggregation_mode]
    handler = handler_class(engine, replies=replies, name=f"dynamo.mocker.{name}")

    endpoint = component.endpoint(config.endpoint)
    stats_endpoint = component.endpoint("stats")
    # a prefill worker registers as the model's prefill pool: it makes the frontend
    # disaggregate that model, but does not list the model by itself
    card = await register_model(
        endpoint,
        model_path=model_path,
        model_name=config.model_name,
        aliases=[str(config.model_path)],
        model_type=["prefill"] if config.disaggregation_mode == "prefill" else None,
        context_length=context_length,
        kv_block_size=config.block_size,
        migration_limit=config.migration_limit,
        parsers=config.parser_spec(),
    )
    logging.getLogger(f"dynamo.mocker.{name}").info(
        "mocker %s: %s mode, model %s, %d blocks of %d tokens, speedup x%g",
        f"{config.namespace}.{name}.{config.endpoint}",
        config.disaggregation_mode,
        card.name if card is not None else model_path.name,
        config.num_gpu_blocks,
        config.block_size,
        config.speedup_ratio,
    )
    return MockerWorker(
        config=config,
        component=component,
        engine=engine,
        handler=handler,
        endpoint=endpoint,
        stats_endpoint=stats_endpoint,
        kv_publisher=kv_publisher,
        metrics_publisher=metrics_publisher,
        card=card,
    )


async def start_engine(
    runtime: DistributedRuntime, parsed: ParsedArgs[MockerConfig]
) -> MockerWorker:
    """The `dynamo.engines` hook (`dynamo-run out=mocker`): `start_mocker` on parsed flags."""
    return await start_mocker(runtime, parsed.config)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[MockerConfig]) -> None:
    mocker = await start_mocker(runtime, args.config)
    try:
        await asyncio.gather(
            mocker.endpoint.serve_endpoint(mocker.handler.generate),
            mocker.stats_endpoint.serve_endpoint(mocker.handler.stats),
        )
    finally:
        await mocker.close()


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv)


if __name__ == "__main__":
    main()
