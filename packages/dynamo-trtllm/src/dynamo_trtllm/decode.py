"""`python -m dynamo_trtllm.decode`: a TensorRT-LLM decode worker (generation-only requests).

    python -m dynamo_trtllm.decode --model-path Qwen/Qwen3-8B

It serves component `backend` (`--component-name`), endpoint `generate`, and registers the model
for chat and completions: the frontend sends it each request with the `disaggregated_params` a
`dynamo_trtllm.prefill` worker returned, which become `DisaggregatedParams(request_type=
"generation_only", ...)`; the engine pulls the KV cache through its cache transceiver
(`cache_transceiver_config: {backend: DEFAULT}` unless `--extra-engine-args` says otherwise). A
request without them is served aggregated, so a decode worker also works alone.
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

ROLE: Role = "decode"
MODULE = "dynamo_trtllm.decode"


class Deployment(TrtllmDeployment):
    name = "trtllm-decode"


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
    from dynamo_trtllm.handlers import TrtllmDecodeHandler

    config = parsed.config
    name = config.resolved_component(ROLE)
    component = runtime.namespace(config.namespace).component(name)
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)

    llm = await start_llm(config, ROLE, parsed)
    handler = TrtllmDecodeHandler(llm, name=f"dynamo.trtllm.{name}")
    block_size = kv_block_size(llm, config)
    publisher = None
    if config.publish_events_and_metrics:
        publisher = await start_publisher(component, llm, block_size)
    card = await register_model(
        endpoint,
        model_path=model_dir(config.model_path),
        model_name=served_model_name(config),
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
