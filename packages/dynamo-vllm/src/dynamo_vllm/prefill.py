"""`python -m dynamo_vllm.prefill`: the prefill half of disaggregated serving on vLLM.

    python -m dynamo_vllm.prefill --model Qwen/Qwen3-0.6B \\
        --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

It serves `{namespace}.prefill.generate` and registers the model as its prefill pool
(`model_type=["prefill"]`): the frontend then sends each prompt here first (`max_tokens=1`),
and hands the `kv_transfer_params` vLLM's KV connector returns to a decode worker
(`python -m dynamo_vllm.decode`, same `--kv-transfer-config`). A KV connector is required.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.errors import ConfigError
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_vllm.args import VllmConfig, engine_args, make_parser, require_vllm

if TYPE_CHECKING:
    from dynamo_vllm.engine import VllmWorker

__all__ = ["Deployment", "build_parser", "main", "start_engine"]


class Deployment(BaseDeployment):
    name = "vllm-prefill"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.prefill",
        "A vLLM prefill worker (disaggregated serving) served as a Dynamo component.",
    )


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[VllmConfig]) -> VllmWorker:
    """Start vLLM with its KV connector and register as the model's prefill pool."""
    from dynamo_core.llm.model_card import register_model
    from dynamo_vllm.engine import VllmWorker, start_vllm
    from dynamo_vllm.handlers import PrefillHandler

    config = parsed.config
    args = engine_args(parsed)
    if args.kv_transfer_config is None:
        raise ConfigError(
            "the prefill worker needs a KV connector: --kv-transfer-config "
            '\'{"kv_connector": "NixlConnector", "kv_role": "kv_both"}\''
        )
    component = runtime.namespace(config.namespace).component(config.resolved_component("prefill"))
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)

    engine = await start_vllm(component, config, args)
    handler = PrefillHandler(
        engine.llm,
        default_sampling=engine.default_sampling,
        name=f"dynamo.vllm.{component.name}",
    )
    card = await register_model(
        endpoint,
        model_path=engine.model_path,
        model_name=engine.model_name,
        model_type=["prefill"],
        context_length=engine.context_length,
        kv_block_size=engine.block_size,
        migration_limit=config.migration_limit,
    )
    logging.getLogger("dynamo.vllm").info(
        "vllm prefill worker %s: model %s, context length %d, KV block size %d",
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
