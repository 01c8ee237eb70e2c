"""`python -m dynamo_sglang.decode`: an SGLang decode worker (`--disaggregation-mode decode`).

    python -m dynamo_sglang.decode --model-path Qwen/Qwen3-0.6B --page-size 16

It serves component `backend`: the frontend sends it each request together with the bootstrap
parameters a prefill worker (`dynamo_sglang.prefill`) handed out, and SGLang pulls the prompt's
KV cache from that prefill worker before decoding. `worker()` is the whole component, runtime
calls in plain sight; SGLang's specifics (`ServerArgs`, the engine, its KV events) are
`SglangAdapter`'s. Importing this module does not import SGLang.
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
from dynamo_sglang.handlers import DecodeHandler

__all__ = ["DecodeHandler", "Deployment", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "sglang-decode"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[SglangConfig]:
    return make_parser(
        "python -m dynamo_sglang.decode",
        "An SGLang decode worker: continues requests whose prompt an SGLang prefill worker "
        "processed, pulling their KV cache from it.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[SglangConfig]) -> None:
    config = args.config
    async with SglangAdapter(args, role="decode") as adapter:  # --disaggregation-mode decode
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model: blocks until SGLang is ready
        handler = adapter.handler(DecodeHandler)
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
    run_component(build_parser(), worker, argv, engine=ENGINE)


if __name__ == "__main__":
    main()
