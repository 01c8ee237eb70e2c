"""`python -m dynamo_vllm.worker`: aggregated serving (prefill and decode) on vLLM.

    python -m dynamo_vllm.worker --model Qwen/Qwen3-0.6B          # next to: python -m dynamo_core.frontend
    python -m dynamo_vllm.worker --model DIR --enforce-eager --max-model-len 4096

Every vLLM engine flag is accepted (`--help` lists them after Dynamo's). The worker serves
`{namespace}.backend.generate`, registers the model with vLLM's real context length and KV block
size, and publishes KV events and load metrics. `dynamo-run out=vllm` runs this module's
`build_parser()` and `start_engine()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_vllm import ENGINE
from dynamo_vllm.args import VllmConfig, make_parser

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
    from dynamo_vllm.engine import start_role
    from dynamo_vllm.handlers import WorkerHandler

    return await start_role(runtime, parsed, "worker", WorkerHandler)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[VllmConfig]) -> None:
    vllm = await start_engine(runtime, args)
    try:
        await vllm.endpoint.serve_endpoint(vllm.handler.generate)
    finally:
        await vllm.close()


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv, engine=ENGINE)


if __name__ == "__main__":
    main()
