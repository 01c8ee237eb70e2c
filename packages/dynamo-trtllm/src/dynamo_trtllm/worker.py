"""`python -m dynamo_trtllm.worker`: an aggregated TensorRT-LLM worker (prefill and decode).

    python -m dynamo_trtllm.worker --model-path Qwen/Qwen3-8B --tensor-parallel-size 2

It serves component `backend` (`--component-name`), endpoint `generate`, registers the model
with the engine's real sequence limit and KV block size, and re-publishes the engine's KV events
and load metrics. With tensor x pipeline parallel size above one it re-runs itself under
`mpirun ... trtllm-llmapi-launch` unless started in an MPI world (`dynamo_trtllm.mpi`).
`dynamo-run out=trtllm` calls this module's `build_parser()` and `start_engine()`.
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

ROLE: Role = "worker"
MODULE = "dynamo_trtllm.worker"


class Deployment(TrtllmDeployment):
    name = "trtllm-worker"


def build_parser() -> DynFlexibleArgumentParser[TrtllmConfig]:
    return trtllm_args.build_parser(ROLE)


async def start_engine(
    runtime: DistributedRuntime, parsed: ParsedArgs[TrtllmConfig]
) -> TrtllmWorker:
    """Create the component, start the engine, register the model (endpoint not served yet)."""
    from dynamo_trtllm.handlers import TrtllmHandler

    return await start_role(runtime, parsed, ROLE, TrtllmHandler)


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
