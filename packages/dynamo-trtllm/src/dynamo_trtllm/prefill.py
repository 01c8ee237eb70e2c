"""`python -m dynamo_trtllm.prefill`: a TensorRT-LLM prefill worker (context-only requests).

    python -m dynamo_trtllm.prefill --model-path Qwen/Qwen3-8B

It serves component `prefill` (`--component-name`), endpoint `generate`, and registers the model
with model type `prefill`: the frontend then sends each prompt here first (`prefill_only`,
`max_tokens=1`) and hands the returned `disaggregated_params` (TensorRT-LLM's
`DisaggregatedParams`, see `dynamo_trtllm.handlers`) to a `dynamo_trtllm.decode` worker. The
engine gets a cache transceiver (`cache_transceiver_config: {backend: DEFAULT}`) and the overlap
scheduler off unless `--extra-engine-args` says otherwise. `worker()` is the
whole component, runtime calls in plain sight; TensorRT-LLM's specifics are `TrtllmAdapter`'s.
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
from dynamo_trtllm.handlers import TrtllmPrefillHandler
from dynamo_trtllm.mpi import relaunch_under_mpi

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(TrtllmDeployment):
    name = "trtllm-prefill"


def build_parser() -> DynFlexibleArgumentParser[TrtllmConfig]:
    return trtllm_args.build_parser("prefill")


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[TrtllmConfig]) -> None:
    config = args.config
    async with TrtllmAdapter(args, role="prefill") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model (in a thread)
        handler = adapter.handler(TrtllmPrefillHandler)
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
    before_run = relaunch_under_mpi("dynamo_trtllm.prefill")  # a multi-GPU engine's MPI world
    run_component(build_parser(), worker, argv, engine=ENGINE, before_run=before_run)


if __name__ == "__main__":
    main()
