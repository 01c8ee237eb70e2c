"""`python -m dynamo_trtllm.worker`: an aggregated TensorRT-LLM worker (prefill and decode).

    python -m dynamo_trtllm.worker --model-path Qwen/Qwen3-8B --tensor-parallel-size 2

It serves component `backend` (`--component-name`), endpoint `generate`, registers the model
with the engine's real sequence limit and KV block size, and re-publishes the engine's KV events
and load metrics. With tensor x pipeline parallel size above one it re-runs itself under
`mpirun ... trtllm-llmapi-launch` unless started in an MPI world (`dynamo_trtllm.mpi`, the
`before_run` hook of `main()`). `worker()` is the whole component, runtime calls in plain sight;
TensorRT-LLM's specifics are `TrtllmAdapter`'s. `dynamo-run out=trtllm` runs this same
`worker()` in its own process (where the LLM API spawns its own ranks).
"""

from __future__ import annotations

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.llm.model_card import register_model
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_trtllm import ENGINE
from dynamo_trtllm import args as trtllm_args
from dynamo_trtllm.args import TrtllmConfig
from dynamo_trtllm.deploy import TrtllmDeployment
from dynamo_trtllm.engine import TrtllmAdapter
from dynamo_trtllm.handlers import TrtllmHandler
from dynamo_trtllm.mpi import relaunch_under_mpi

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(TrtllmDeployment):
    name = "trtllm-worker"


def build_parser() -> DynFlexibleArgumentParser[TrtllmConfig]:
    return trtllm_args.build_parser("worker")


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[TrtllmConfig]) -> None:
    config = args.config
    async with TrtllmAdapter(args, role="worker") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model (in a thread)
        handler = adapter.handler(TrtllmHandler)
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
    before_run = relaunch_under_mpi("dynamo_trtllm.worker")  # a multi-GPU engine's MPI world
    run_component(build_parser(), worker, argv, engine=ENGINE, before_run=before_run)


if __name__ == "__main__":
    main()
