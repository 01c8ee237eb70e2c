"""`python -m dynamo_trtllm.decode`: a TensorRT-LLM decode worker (generation-only requests).

    python -m dynamo_trtllm.decode --model-path Qwen/Qwen3-8B

It serves component `backend` (`--component-name`), endpoint `generate`, and registers the model
for chat and completions: the frontend sends it each request with the `disaggregated_params` a
`dynamo_trtllm.prefill` worker returned, which become `DisaggregatedParams(request_type=
"generation_only", ...)`; the engine pulls the KV cache through its cache transceiver
(`cache_transceiver_config: {backend: DEFAULT}` unless `--extra-engine-args` says otherwise). A
request without them is served aggregated, so a decode worker also works alone. `worker()` is the
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
from dynamo_trtllm.handlers import TrtllmDecodeHandler
from dynamo_trtllm.mpi import relaunch_under_mpi

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(TrtllmDeployment):
    name = "trtllm-decode"


def build_parser() -> DynFlexibleArgumentParser[TrtllmConfig]:
    return trtllm_args.build_parser("decode")


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[TrtllmConfig]) -> None:
    config = args.config
    async with TrtllmAdapter(args, role="decode") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model (in a thread)
        handler = adapter.handler(TrtllmDecodeHandler)
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
    before_run = relaunch_under_mpi("dynamo_trtllm.decode")  # a multi-GPU engine's MPI world
    run_component(build_parser(), worker, argv, engine=ENGINE, before_run=before_run)


if __name__ == "__main__":
    main()
