"""`dynamo_core.mocker`: a simulated engine for CPU-only graphs, tests and benchmarks.

`python -m dynamo_core.mocker --model-path DIR` serves it as a component (`main.py`: the
role-module recipe; `worker.run_in(runtime, args)` runs the same inside a process), its start-up
half in `adapter.py` (`MockerAdapter`). The simulation (continuous
batching, paged KV cache with prefix reuse, timing, KV events) is in `engine.py` and
`kv_cache.py`; the handlers on the core bases in `handlers.py`. What a request is answered with
when it is not random tokens is in `replies.py`: a reply script's text (`script.py`,
`--reply-script`) or text satisfying its structured-output constraint (`guided.py`, with the
regex and grammar generator in `_textgen.py`).

Only the component surface is imported eagerly (cheap, no LLM layer); the engine and handler
classes load on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_core._lazy import lazy_attributes
from dynamo_core.mocker.adapter import MockerAdapter
from dynamo_core.mocker.main import Deployment, MockerConfig, build_parser, main, worker

if TYPE_CHECKING:
    from dynamo_core.mocker.engine import MockerEngine, MockerEngineArgs, TimingModel
    from dynamo_core.mocker.handlers import (
        MockerDecodeHandler,
        MockerHandler,
        MockerPrefillHandler,
    )
    from dynamo_core.mocker.kv_cache import KvCache

__all__ = [
    "Deployment",
    "KvCache",
    "MockerAdapter",
    "MockerConfig",
    "MockerDecodeHandler",
    "MockerEngine",
    "MockerEngineArgs",
    "MockerHandler",
    "MockerPrefillHandler",
    "TimingModel",
    "build_parser",
    "main",
    "worker",
]

_LAZY = {
    "MockerEngine": "dynamo_core.mocker.engine",
    "MockerEngineArgs": "dynamo_core.mocker.engine",
    "TimingModel": "dynamo_core.mocker.engine",
    "MockerHandler": "dynamo_core.mocker.handlers",
    "MockerPrefillHandler": "dynamo_core.mocker.handlers",
    "MockerDecodeHandler": "dynamo_core.mocker.handlers",
    "KvCache": "dynamo_core.mocker.kv_cache",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
