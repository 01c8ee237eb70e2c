"""`python -m dynamo_trtllm.prefill`: a TensorRT-LLM prefill worker (context-only requests).

    python -m dynamo_trtllm.prefill --model-path Qwen/Qwen3-8B

It serves component `prefill` (`--component-name`), endpoint `generate`, and registers the model
with model type `prefill`: the frontend then sends each prompt here first (`prefill_only`,
`max_tokens=1`) and hands the returned `disaggregated_params` (TensorRT-LLM's
`DisaggregatedParams`, see `dynamo_trtllm.handlers`) to a `dynamo_trtllm.decode` worker. The
engine gets a cache transceiver (`cache_transceiver_config: {backend: DEFAULT}`) and the overlap
scheduler off unless `--extra-engine-args` says otherwise.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.errors import ConfigError
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_trtllm import args as trtllm_args
from dynamo_trtllm.args import Role, TrtllmConfig
from dynamo_trtllm.deploy import TrtllmDeployment
from dynamo_trtllm.engine import TrtllmWorker
from dynamo_trtllm.mpi import maybe_relaunch

__all__ = ["Deployment", "build_parser", "main", "start_engine"]

ROLE: Role = "prefill"
MODULE = "dynamo_trtllm.prefill"


class Deployment(TrtllmDeployment):
    name = "trtllm-prefill"


def build_parser() -> DynFlexibleArgumentParser[TrtllmConfig]:
    return trtllm_args.build_parser(ROLE)


async def start_engine(
    runtime: DistributedRuntime, parsed: ParsedArgs[TrtllmConfig]
) -> TrtllmWorker:
    """Create the component, start the engine, register the model (endpoint not served yet)."""
    from dynamo_core.llm.model_card import register_model
    from dynamo_trtllm.engine import (
        context_length,
        kv_block_size,
        model_dir,
        served_model_name,
        start_llm,
        start_publisher,
    )
    from dynamo_trtllm.handlers import TrtllmPrefillHandler

    config = parsed.config
    name = config.resolved_component(ROLE)
    component = runtime.namespace(config.namespace).component(name)
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)

    llm = await start_llm(config, ROLE, parsed)
    handler = TrtllmPrefillHandler(llm, name=f"dynamo.trtllm.{name}")
    block_size = kv_block_size(llm, config)
    publisher = None
    if config.publish_events_and_metrics:
        publisher = await start_publisher(component, llm, block_size)
    card = await register_model(
        endpoint,
        model_path=model_dir(config.model_path),
        model_name=served_model_name(config),
        model_type=["prefill"],
        context_length=context_length(llm, config),
        kv_block_size=block_size,
        migration_limit=config.migration_limit,
    )
    return TrtllmWorker(llm, handler, endpoint, card, publisher)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, config: TrtllmConfig, parsed: Any) -> None:
    trt = await start_engine(runtime, parsed)
    try:
        await trt.endpoint.serve_endpoint(trt.handler.generate)
    finally:
        await trt.close()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = build_parser().parse_or_exit(argv)
    trtllm_args.require_engine()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        maybe_relaunch(parsed.config.world_size, parsed.config.mpi_launcher, MODULE, argv)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
    sys.exit(worker(parsed.config, parsed))


if __name__ == "__main__":
    main()
