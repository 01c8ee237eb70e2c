"""`python -m dynamo_vllm.decode`: the decode half of disaggregated serving on vLLM.

    python -m dynamo_vllm.decode --model Qwen/Qwen3-0.6B \\
        --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

It serves `{namespace}.backend.generate` and registers the model like the aggregated worker.
A request that carries `disaggregated_params={"kv_transfer_params": ...}` (from a
`dynamo_vllm.prefill` worker, via the frontend) has its KV cache pulled by vLLM's KV connector
instead of computed; any other request is served whole, so a decode worker also works alone.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_vllm.args import VllmConfig, engine_args, make_parser, require_vllm

if TYPE_CHECKING:
    from dynamo_vllm.engine import VllmWorker

__all__ = ["Deployment", "build_parser", "main", "start_engine"]


class Deployment(BaseDeployment):
    name = "vllm-decode"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.decode",
        "A vLLM decode worker (disaggregated serving) served as a Dynamo component.",
    )


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[VllmConfig]) -> VllmWorker:
    """Start vLLM with its KV connector and register the model for decoding."""
    from dynamo_core.llm.model_card import register_model
    from dynamo_vllm.engine import VllmWorker, start_vllm
    from dynamo_vllm.handlers import DecodeHandler

    config = parsed.config
    args = engine_args(parsed)
    log = logging.getLogger("dynamo.vllm")
    if args.kv_transfer_config is None:
        log.warning("no --kv-transfer-config: this decode worker can only serve whole requests")
    component = runtime.namespace(config.namespace).component(config.resolved_component())
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)

    engine = await start_vllm(component, config, args)
    handler = DecodeHandler(
        engine.llm,
        default_sampling=engine.default_sampling,
        name=f"dynamo.vllm.{component.name}",
    )
    card = await register_model(
        endpoint,
        model_path=engine.model_path,
        model_name=engine.model_name,
        context_length=engine.context_length,
        kv_block_size=engine.block_size,
        migration_limit=config.migration_limit,
    )
    log.info(
        "vllm decode worker %s: model %s, context length %d, KV block size %d",
        card.endpoint,
        card.name,
        card.context_length,
        card.kv_block_size,
    )
    return VllmWorker(engine, handler, endpoint, card)


@dynamo_worker()
async def worker(
    runtime: DistributedRuntime, config: VllmConfig, parsed: ParsedArgs[VllmConfig]
) -> None:
    vllm = await start_engine(runtime, parsed)
    try:
        await vllm.endpoint.serve_endpoint(vllm.handler.generate)
    finally:
        await vllm.close()


def main(argv: list[str] | None = None) -> None:
    parsed = build_parser().parse_or_exit(argv)
    require_vllm()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(worker(parsed.config, parsed))


if __name__ == "__main__":
    main()
