"""`python -m dynamo_sglang.prefill`: an SGLang prefill worker (`--disaggregation-mode prefill`).

    python -m dynamo_sglang.prefill --model-path Qwen/Qwen3-0.6B --page-size 16 \
        --disaggregation-bootstrap-port 8998

It serves component `prefill` and registers the model as its prefill pool, which makes the
frontend disaggregate the model. For each request it hands out SGLang's bootstrap parameters
(this worker's bootstrap host and port, and a fresh random `bootstrap_room`) at once, then
prefills; the frontend starts the decode leg (`dynamo_sglang.decode`) with those parameters and
SGLang moves the KV cache between the two engines. Decode workers must reach this machine at
`--bootstrap-host` (default: the host of `--dist-init-addr`, else this machine's address) on
`--disaggregation-bootstrap-port`.
"""

from __future__ import annotations

import logging
from typing import Any

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.llm.kv import KV_EVENTS_TOPIC
from dynamo_core.llm.model_card import register_model
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_sglang import ENGINE
from dynamo_sglang.args import (
    SglangConfig,
    make_parser,
    resolve_mode,
    server_args_from,
)
from dynamo_sglang.engine import (
    EngineInfo,
    SglangWorker,
    bootstrap_address,
    prepare_kv_events,
    start_sglang,
    stop_sglang,
)
from dynamo_sglang.handlers import PrefillHandler

__all__ = ["Deployment", "PrefillHandler", "build_parser", "main", "start_engine"]


class Deployment(BaseDeployment):
    name = "sglang-prefill"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[SglangConfig]:
    return make_parser(
        "python -m dynamo_sglang.prefill",
        "An SGLang prefill worker: processes prompts and hands their KV cache to SGLang decode "
        "workers through SGLang's bootstrap server.",
    )


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[Any]) -> SglangWorker:
    """The same worker, started for a caller that serves it (tests, embedding)."""
    from dynamo_sglang.worker import start_worker

    return await start_worker(runtime, parsed, "prefill")


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[SglangConfig]) -> None:
    config = args.config
    resolve_mode(args, "prefill")
    server_args = server_args_from(args)

    component = runtime.namespace(config.namespace).component(config.resolved_component("prefill"))
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)
    kv_relay = prepare_kv_events(
        server_args,
        await component.event_publisher(KV_EVENTS_TOPIC),
        config.kv_events,
        config.kv_events_port,
    )

    engine = None
    try:
        engine = start_sglang(server_args)  # loads the model: blocks until SGLang is ready
        served = args.engine_sources.get("served_model_name", "default") != "default"
        info = EngineInfo.of(engine, served_name_given=served)
        handler = PrefillHandler(
            engine,
            bootstrap_host=bootstrap_address(config.bootstrap_host, info.settings),
            bootstrap_port=info.bootstrap_port,
            incremental_output=info.incremental_output,
        )
        if kv_relay is not None:
            kv_relay.start(info.page_size)
        card = await register_model(
            endpoint,
            model_path=info.model_dir,
            model_name=info.served_model_name,
            model_type=["prefill"],  # this worker is the model's prefill pool
            context_length=info.context_length,
            kv_block_size=info.page_size,
            migration_limit=config.migration_limit,
            parsers=config.parser_spec(),
        )
        logging.getLogger("dynamo.sglang").info(
            "sglang prefill worker %s.%s: model %s, bootstrap %s:%d",
            component.name,
            endpoint.name,
            card.name,
            handler.bootstrap_host,
            handler.bootstrap_port,
        )
        await endpoint.serve_endpoint(handler.generate)
    finally:
        await stop_sglang(engine, kv_relay)


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv, engine=ENGINE)


if __name__ == "__main__":
    main()
