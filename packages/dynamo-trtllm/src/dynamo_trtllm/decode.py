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

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_trtllm import ENGINE
from dynamo_trtllm import args as trtllm_args
from dynamo_trtllm.args import Role, TrtllmConfig
from dynamo_trtllm.deploy import TrtllmDeployment
from dynamo_trtllm.engine import TrtllmWorker, start_role
from dynamo_trtllm.mpi import relaunch_under_mpi

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
    from dynamo_trtllm.handlers import TrtllmDecodeHandler

    return await start_role(runtime, parsed, ROLE, TrtllmDecodeHandler)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[TrtllmConfig]) -> None:
    trt = await start_engine(runtime, args)
    try:
        await trt.endpoint.serve_endpoint(trt.handler.generate)
    finally:
        await trt.close()


def main(argv: list[str] | None = None) -> None:
    run_component(
        build_parser(), worker, argv, engine=ENGINE, before_run=relaunch_under_mpi(MODULE)
    )


if __name__ == "__main__":
    main()
