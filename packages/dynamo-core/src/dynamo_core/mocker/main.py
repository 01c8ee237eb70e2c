"""`python -m dynamo_core.mocker`: a simulated engine served as a real Dynamo component.

    python -m dynamo_core.mocker --model-path examples/models/tiny --speedup-ratio 10
    python3 path/to/dynamo_core/mocker/main.py --model-path DIR           # the same, as a script

It registers a model card (in prefill mode, as the model's prefill pool), serves `generate`
(token streams, on `MockerHandler`, `MockerPrefillHandler` or `MockerDecodeHandler` by
`--disaggregation-mode`; with `--embedding-worker`, an embedding model's vectors on
`MockerEmbeddingHandler`, for `/v1/embeddings`) and `stats` (engine counters), and publishes KV events and load metrics
on the event plane, exactly as an engine worker does; only the engine is simulated
(`dynamo_core.mocker.engine` explains how). `worker()` is the whole component, runtime calls in
plain sight, as in every engine's role modules; what is the mocker's own is `MockerAdapter`
(`adapter.py`). `dynamo-run out=mocker` and tests run this same `worker()` inside their own
process (`worker.run_in`). Importing this module is cheap: the engine, the tokenizer and the
handlers are imported when the adapter starts, so `--help` and `--print-config` answer at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

from pydantic import Field

from dynamo_core.adapter import WorkerConfig
from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.llm.kv_log import KV_REPLAY_ENDPOINT
from dynamo_core.llm.model_card import register_model
from dynamo_core.mocker.adapter import MockerAdapter
from dynamo_core.runtime import DistributedRuntime, dynamo_worker

__all__ = ["Deployment", "MockerConfig", "build_parser", "main", "worker"]

DisaggregationMode = Literal["agg", "prefill", "decode"]


class MockerConfig(WorkerConfig):
    """The mocker's flags (NVIDIA Dynamo's mocker and vLLM's names where they exist)."""

    model_path: Path = Field(
        description="Model folder holding tokenizer.json (and config.json): the vocabulary the "
        "simulated tokens come from, and the tokenizer the frontend loads."
    )
    model_name: str | None = Field(
        default=None, description="Served model name (default: the model folder's name)."
    )
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
    embedding_worker: bool = Field(
        default=False,
        description="Serve the model as an embedding model (/v1/embeddings), as Dynamo's "
        "--embedding-worker: each input is prefilled on the simulated engine, then answered "
        "with a deterministic unit vector seeded from its token ids (and --seed); "
        "`dimensions` shortens it (first values, renormalised).",
    )
    embedding_size: int | None = Field(
        default=None,
        gt=0,
        description="Values per vector of --embedding-worker (default: config.json's "
        "hidden_size, else 256).",
    )


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


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[MockerConfig]) -> None:
    config = args.config
    async with MockerAdapter(
        args
    ) as adapter:  # the role: --disaggregation-mode, --embedding-worker
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)
        handler = adapter.embedding_handler() if engine.embedding else adapter.handler()
        await register_model(
            endpoint,
            model_path=engine.model_dir,
            model_name=engine.served_name,
            aliases=engine.aliases,
            model_type=["prefill"] if adapter.role == "prefill" else None,
            context_length=engine.context_length,
            kv_block_size=engine.kv_block_size,
            migration_limit=config.migration_limit,
            parsers=config.parser_spec(),
            embedding=engine.embedding,
        )
        await asyncio.gather(
            endpoint.serve_endpoint(handler.generate),
            component.endpoint("stats").serve_endpoint(handler.stats),
            component.endpoint(KV_REPLAY_ENDPOINT).serve_endpoint(adapter.kv_log.replay),
        )


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv)


if __name__ == "__main__":
    main()
