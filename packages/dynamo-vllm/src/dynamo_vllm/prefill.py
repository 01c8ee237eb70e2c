"""`python -m dynamo_vllm.prefill`: the prefill half of disaggregated serving on vLLM.

    python -m dynamo_vllm.prefill --model Qwen/Qwen3-0.6B \\
        --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

It serves `{namespace}.prefill.generate` and registers the model as its prefill pool
(`model_type=["prefill"]`): the frontend then sends each prompt here first (`max_tokens=1`),
and hands the `kv_transfer_params` vLLM's KV connector returns to a decode worker
(`python -m dynamo_vllm.decode`, same `--kv-transfer-config`). A KV connector is required
(`VllmAdapter` says so before anything starts).
"""

from __future__ import annotations

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.llm.model_card import register_model
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_vllm import ENGINE
from dynamo_vllm.args import VllmConfig, make_parser
from dynamo_vllm.engine import VllmAdapter
from dynamo_vllm.handlers import PrefillHandler

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "vllm-prefill"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.prefill",
        "A vLLM prefill worker (disaggregated serving) served as a Dynamo component.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[VllmConfig]) -> None:
    config = args.config
    async with VllmAdapter(args, role="prefill") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model (in a thread)
        handler = adapter.handler(PrefillHandler)
        await register_model(
            endpoint,
            model_path=engine.model_dir,
            model_name=engine.served_name,
            aliases=engine.aliases,
            model_type=["prefill"],  # this worker is the model's prefill pool
            context_length=engine.context_length,
            kv_block_size=engine.kv_block_size,
            migration_limit=config.migration_limit,
            parsers=config.parser_spec(),
        )
        await endpoint.serve_endpoint(handler.generate)


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv, engine=ENGINE)


if __name__ == "__main__":
    main()
