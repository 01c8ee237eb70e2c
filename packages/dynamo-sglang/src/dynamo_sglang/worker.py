"""`python -m dynamo_sglang.worker`: an SGLang worker whose role SGLang's flags decide.

    python -m dynamo_sglang.worker --model-path Qwen/Qwen3-0.6B --page-size 16

With SGLang's default `--disaggregation-mode null` it serves prefill and decode in one engine
(component `backend`); `--disaggregation-mode prefill` or `decode` turns it into the matching
disaggregated worker (as `dynamo_sglang.prefill` / `dynamo_sglang.decode` do without the flag).

This is also the module `dynamo-run out=sglang` loads (the `dynamo.engines` entry point):
`build_parser()` and `start_engine(runtime, parsed)` below are what it calls, so both paths run
the same code. Importing this module does not import SGLang.
"""

from __future__ import annotations

import logging
from typing import Any

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_sglang import ENGINE
from dynamo_sglang.args import (
    Mode,
    SglangConfig,
    make_parser,
    resolve_mode,
    server_args_from,
)
from dynamo_sglang.engine import (
    EngineInfo,
    SglangWorker,
    make_handler,
    prepare_kv_events,
    start_sglang,
    stop_sglang,
)

__all__ = ["Deployment", "build_parser", "main", "start_engine", "start_worker"]


class Deployment(BaseDeployment):
    name = "sglang-worker"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")


def build_parser() -> DynFlexibleArgumentParser[SglangConfig]:
    return make_parser(
        "python -m dynamo_sglang.worker",
        "An SGLang worker served as a Dynamo component: aggregated, or prefill/decode as "
        "SGLang's --disaggregation-mode says.",
    )


async def start_worker(
    runtime: DistributedRuntime, parsed: ParsedArgs[SglangConfig], role: Mode | None
) -> SglangWorker:
    """Start SGLang as `role` (None: as --disaggregation-mode says), register the model and
    return the worker, ready to `serve()`."""
    from dynamo_core.llm.kv import KV_EVENTS_TOPIC
    from dynamo_core.llm.model_card import register_model

    if parsed.engine_args is None:
        raise ENGINE.not_installed()
    config = parsed.config
    mode = resolve_mode(parsed, role)
    server_args = server_args_from(parsed)

    name = config.resolved_component(mode)
    component = runtime.namespace(config.namespace).component(name)
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)
    kv_publisher = await component.event_publisher(KV_EVENTS_TOPIC)
    kv_relay = prepare_kv_events(server_args, kv_publisher, config.kv_events, config.kv_events_port)

    engine = start_sglang(server_args)
    try:
        served = parsed.engine_sources.get("served_model_name", "default") != "default"
        info = EngineInfo.of(engine, served_name_given=served)
        handler = make_handler(
            engine, mode, info, bootstrap_host=config.bootstrap_host, name=f"dynamo.sglang.{name}"
        )
        if kv_relay is not None:
            kv_relay.start(info.page_size)
        card = await register_model(
            endpoint,
            model_path=info.model_dir,
            model_name=info.served_model_name,
            model_type=["prefill"] if mode == "prefill" else None,
            context_length=info.context_length,
            kv_block_size=info.page_size,
            migration_limit=config.migration_limit,
            parsers=config.parser_spec(),
        )
    except BaseException:
        await stop_sglang(engine, kv_relay)
        raise
    logging.getLogger("dynamo.sglang").info(
        "sglang %s worker %s: model %s, context %d, page size %d",
        mode if mode != "null" else "aggregated",
        f"{config.namespace}.{name}.{config.endpoint}",
        card.name,
        info.context_length,
        info.page_size,
    )
    return SglangWorker(engine, handler, endpoint, card, kv_relay)


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[Any]) -> SglangWorker:
    """The `dynamo.engines` hook (`dynamo-run out=sglang`)."""
    return await start_worker(runtime, parsed, None)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[SglangConfig]) -> None:
    sglang_worker = await start_worker(runtime, args, None)
    try:
        await sglang_worker.endpoint.serve_endpoint(sglang_worker.handler.generate)
    finally:
        await sglang_worker.close()


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv, engine=ENGINE)


if __name__ == "__main__":
    main()
