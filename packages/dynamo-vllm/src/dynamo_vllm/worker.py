"""`python -m dynamo_vllm.worker`: aggregated serving (prefill and decode) on vLLM.

    python -m dynamo_vllm.worker --model Qwen/Qwen3-0.6B          # next to: python -m dynamo_core.frontend
    python -m dynamo_vllm.worker --model DIR --enforce-eager --max-model-len 4096

Every vLLM engine flag is accepted (`--help` lists them after Dynamo's). The worker serves
`{namespace}.backend.generate`, registers the model with vLLM's real context length and KV block
size, and publishes KV events and load metrics. `dynamo-run out=vllm` runs this module's
`build_parser()` and `start_engine()`.
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
    name = "vllm-worker"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.worker",
        "A vLLM worker (aggregated: prefill and decode) served as a Dynamo component.",
    )


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[VllmConfig]) -> VllmWorker:
    """Start vLLM, register the model; `serve()` on the result serves `generate`."""
    from dynamo_core.llm.model_card import register_model
    from dynamo_vllm.engine import VllmWorker, start_vllm
    from dynamo_vllm.handlers import WorkerHandler

    config = parsed.config
    component = runtime.namespace(config.namespace).component(config.resolved_component())
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)

    engine = await start_vllm(component, config, engine_args(parsed))
    handler = WorkerHandler(
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
    logging.getLogger("dynamo.vllm").info(
        "vllm worker %s: model %s, context length %d, KV block size %d",
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
