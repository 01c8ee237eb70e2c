"""`python -m dynamo_vllm.decode`: the decode half of disaggregated serving on vLLM.

    python -m dynamo_vllm.decode --model Qwen/Qwen3-0.6B \\
        --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

It serves `{namespace}.backend.generate` and registers the model like the aggregated worker.
A request that carries `disaggregated_params={"kv_transfer_params": ...}` (from a
`dynamo_vllm.prefill` worker, via the frontend) has its KV cache pulled by vLLM's KV connector
instead of computed; any other request is served whole, so a decode worker also works alone.
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
from dynamo_vllm.handlers import DecodeHandler

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "vllm-decode"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.decode",
        "A vLLM decode worker (disaggregated serving) served as a Dynamo component.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[VllmConfig]) -> None:
    config = args.config
    async with VllmAdapter(args, role="decode") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model (in a thread)
        handler = adapter.handler(DecodeHandler)
        await register_model(
            endpoint,
            model_path=engine.model_dir,
            model_name=engine.served_name,
            aliases=engine.aliases,
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
