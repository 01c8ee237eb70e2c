"""`python -m dynamo_vllm.decode`: the decode half of disaggregated serving on vLLM.

    python -m dynamo_vllm.decode --model Qwen/Qwen3-0.6B \\
        --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

It serves `{namespace}.backend.generate` and registers the model like the aggregated worker.
A request that carries `disaggregated_params={"kv_transfer_params": ...}` (from a
`dynamo_vllm.prefill` worker, via the frontend) has its KV cache pulled by vLLM's KV connector
instead of computed; any other request is served whole, so a decode worker also works alone.
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
    name = "vllm-decode"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.decode",
        "A vLLM decode worker (disaggregated serving) served as a Dynamo component.",
    )


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[VllmConfig]) -> VllmWorker:
    """Start vLLM with its KV connector and register the model for decoding."""
    from dynamo_vllm.engine import start_role
    from dynamo_vllm.handlers import DecodeHandler

    return await start_role(runtime, parsed, "decode", DecodeHandler)


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
