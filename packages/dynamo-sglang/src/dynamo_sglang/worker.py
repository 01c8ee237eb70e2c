"""`python -m dynamo_sglang.worker`: an SGLang worker whose role SGLang's flags decide.

    python -m dynamo_sglang.worker --model-path Qwen/Qwen3-0.6B --page-size 16

With SGLang's default `--disaggregation-mode null` it serves prefill and decode in one engine
(component `backend`); `--disaggregation-mode prefill` or `decode` turns it into the matching
disaggregated worker (as `dynamo_sglang.prefill` / `dynamo_sglang.decode` do without the flag).

This is also the module `dynamo-run out=sglang` loads (the `dynamo.engines` entry point): it
runs this same `worker()` in its own process. `worker()` is the whole component, runtime calls in
plain sight; SGLang's specifics are `SglangAdapter`'s. Importing this module does not import
SGLang.
"""

from __future__ import annotations

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.llm.model_card import register_model
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_sglang import ENGINE
from dynamo_sglang.args import SglangConfig, make_parser
from dynamo_sglang.engine import SglangAdapter

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "sglang-worker"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[SglangConfig]:
    return make_parser(
        "python -m dynamo_sglang.worker",
        "An SGLang worker served as a Dynamo component: aggregated, or prefill/decode as "
        "SGLang's --disaggregation-mode says.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[SglangConfig]) -> None:
    config = args.config
    async with SglangAdapter(args) as adapter:  # the role: --disaggregation-mode
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model: blocks until SGLang is ready
        handler = adapter.handler()
        await register_model(
            endpoint,
            model_path=engine.model_dir,
            model_name=engine.served_name,
            aliases=engine.aliases,
            model_type=["prefill"] if adapter.role == "prefill" else None,
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
