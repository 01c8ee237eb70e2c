"""`python -m dynamo_vllm.prefill`: the prefill half of disaggregated serving on vLLM.

    python -m dynamo_vllm.prefill --model Qwen/Qwen3-0.6B \\
        --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

It serves `{namespace}.prefill.generate` and registers the model as its prefill pool
(`model_type=["prefill"]`): the frontend then sends each prompt here first (`max_tokens=1`),
and hands the `kv_transfer_params` vLLM's KV connector returns to a decode worker
(`python -m dynamo_vllm.decode`, same `--kv-transfer-config`). A KV connector is required.
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
    name = "vllm-prefill"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.prefill",
        "A vLLM prefill worker (disaggregated serving) served as a Dynamo component.",
    )


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[VllmConfig]) -> VllmWorker:
    """Start vLLM with its KV connector and register as the model's prefill pool."""
    from dynamo_vllm.engine import start_role
    from dynamo_vllm.handlers import PrefillHandler

    return await start_role(runtime, parsed, "prefill", PrefillHandler)


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
