"""The engine-adapter contract (`dynamo_core.adapter`): shared worker flags, the adapter's life."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dynamo_core.adapter import EngineAdapter, EngineInfo, WorkerConfig
from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.handlers import BaseWorkerHandler


def test_worker_flags_are_declared_once() -> None:
    parser = DynFlexibleArgumentParser(WorkerConfig, prog="w")
    args = parser.parse(["--component-name", "mine", "--migration-limit", "0"], environ={})
    assert args.config.resolved_component("prefill") == "mine"
    assert args.config.endpoint == "generate" and args.config.migration_limit == 0
    default = parser.parse([], environ={"DYN_ENDPOINT": "gen2"}).config
    assert default.resolved_component("prefill") == "prefill"
    assert default.resolved_component("worker") == default.resolved_component("decode") == "backend"
    assert default.endpoint == "gen2"


class _Adapter(EngineAdapter[WorkerConfig]):
    def __init__(self, args: Any) -> None:
        super().__init__(args, "decode")
        self.closed = 0

    async def start(self, component: Any) -> EngineInfo:
        return EngineInfo(context_length=None, kv_block_size=16, model_dir=Path("."))

    def handler(self, cls: type[BaseWorkerHandler] | None = None) -> BaseWorkerHandler:
        raise NotImplementedError

    async def close(self) -> None:
        self.closed += 1


async def test_the_adapter_closes_on_every_way_out() -> None:
    args = DynFlexibleArgumentParser(WorkerConfig, prog="w").parse([], environ={})
    adapter = _Adapter(args)
    assert (adapter.role, adapter.config) == ("decode", args.config)
    async with adapter as entered:
        assert entered is adapter
        info = await adapter.start(None)
    assert adapter.closed == 1
    assert (info.served_name, info.aliases) == (None, ())
    with pytest.raises(RuntimeError, match="registration failed"):
        async with adapter:
            raise RuntimeError("registration failed")
    assert adapter.closed == 2
