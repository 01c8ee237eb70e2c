"""`python -m dynamo_vllm.worker`: aggregated serving (prefill and decode) on vLLM.

    python -m dynamo_vllm.worker --model Qwen/Qwen3-0.6B          # next to: python -m dynamo_core.frontend
    python -m dynamo_vllm.worker --model DIR --enforce-eager --max-model-len 4096
    python3 path/to/dynamo_vllm/worker.py --model DIR              # the same, as a script

Every vLLM engine flag is accepted (`--help` lists them after Dynamo's). The worker serves
`{namespace}.backend.generate`, registers the model with vLLM's real context length and KV block
size, and publishes KV events and load metrics. `worker()` is the whole component, runtime calls
in plain sight; vLLM's specifics (engine arguments, `AsyncLLM`, KV events, stat logger) are
`VllmAdapter`'s. `dynamo-run out=vllm` runs this same `worker()` in its own process. Importing
this module does not import vLLM.
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
from dynamo_vllm.handlers import WorkerHandler

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "vllm-worker"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.worker",
        "A vLLM worker (aggregated: prefill and decode) served as a Dynamo component.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[VllmConfig]) -> None:
    config = args.config
    async with VllmAdapter(args, role="worker") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model (in a thread)
        handler = adapter.handler(WorkerHandler)
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
