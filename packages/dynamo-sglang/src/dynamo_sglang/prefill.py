"""`python -m dynamo_sglang.prefill`: an SGLang prefill worker (`--disaggregation-mode prefill`).

    python -m dynamo_sglang.prefill --model-path Qwen/Qwen3-0.6B --page-size 16 \
        --disaggregation-bootstrap-port 8998

It serves component `prefill` and registers the model as its prefill pool, which makes the
frontend disaggregate the model. For each request it hands out SGLang's bootstrap parameters
(this worker's bootstrap host and port, and a fresh random `bootstrap_room`) at once, then
prefills; the frontend starts the decode leg (`dynamo_sglang.decode`) with those parameters and
SGLang moves the KV cache between the two engines. Decode workers must reach this machine at
`--bootstrap-host` (default: the host of `--dist-init-addr`, else this machine's address) on
`--disaggregation-bootstrap-port`. `worker()` is the whole component, runtime calls in plain
sight; SGLang's specifics are `SglangAdapter`'s.
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
from dynamo_sglang.handlers import PrefillHandler

__all__ = ["Deployment", "PrefillHandler", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "sglang-prefill"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[SglangConfig]:
    return make_parser(
        "python -m dynamo_sglang.prefill",
        "An SGLang prefill worker: processes prompts and hands their KV cache to SGLang decode "
        "workers through SGLang's bootstrap server.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[SglangConfig]) -> None:
    config = args.config
    async with SglangAdapter(args, role="prefill") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model: blocks until SGLang is ready
        handler = adapter.handler(PrefillHandler)
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
    run_component(build_parser(), worker, argv, engine=ENGINE)


if __name__ == "__main__":
    main()
