"""The SGLang worker's flags: Dynamo's (`SglangConfig`) plus SGLang's own, in one parser.

SGLang's flags come from SGLang itself (`ServerArgs.add_cli_args`), so every flag, default and
choice is SGLang's; `ServerArgs.from_cli_args` turns the merged namespace into the engine's
`ServerArgs`. `--model-path` is SGLang's flag and also fills `SglangConfig.model_path`.
`--config` selects a Dynamo config or graph file: SGLang's own `--config` YAML is not available
(put its keys in the Dynamo config file instead; they mean the same).

What a worker does is SGLang's `--disaggregation-mode` (null: aggregated, prefill, decode);
`dynamo_sglang.prefill` and `dynamo_sglang.decode` set it for you (`resolve_mode`).
`dynamo_sglang.embedding` sets SGLang's `--is-embedding` (`resolve_embedding`); the generating
roles refuse that flag, which would make SGLang load a model they cannot serve.

Importing this module never imports SGLang: `add_sglang_args` does, when the parser is built.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

from pydantic import Field

from dynamo_core.adapter import WorkerConfig
from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.errors import ConfigError
from dynamo_core.llm.kv_relay import KvRelayConfig

__all__ = [
    "EXTRA",
    "Mode",
    "SglangConfig",
    "add_sglang_args",
    "make_parser",
    "resolve_embedding",
    "resolve_mode",
    "server_args_from",
]

EXTRA = "dynamo-sglang[sglang]"

#: SGLang's `--disaggregation-mode` values.
Mode = Literal["null", "prefill", "decode"]


class SglangConfig(KvRelayConfig, WorkerConfig):
    """Dynamo's flags of an SGLang worker (SGLang's own flags are SGLang's)."""

    model_path: str | None = Field(
        default=None,
        description="Model folder or Hugging Face id (SGLang's --model-path; required by SGLang).",
    )
    bootstrap_host: str | None = Field(
        default=None,
        description="Prefill mode: the address decode workers reach this worker's bootstrap "
        "server at (default: the host of --dist-init-addr, else this machine's address).",
    )


def add_sglang_args(parser: argparse.ArgumentParser) -> None:
    """SGLang's own flags (raises ImportError without SGLang)."""
    from sglang.srt.server_args import ServerArgs

    ServerArgs.add_cli_args(parser)


def make_parser(prog: str, description: str) -> DynFlexibleArgumentParser[SglangConfig]:
    return DynFlexibleArgumentParser(
        SglangConfig,
        prog=prog,
        description=description,
        engine_args=add_sglang_args,
        engine_name="sglang",
        engine_extra=EXTRA,
    )


def resolve_mode(parsed: ParsedArgs[SglangConfig], role: Mode | None) -> Mode:
    """The worker's disaggregation mode: the role module's, else SGLang's `--disaggregation-mode`.

    A role module (`prefill`, `decode`) sets the mode unless the user gave a different one,
    which is an error rather than a surprise.
    """
    ns = parsed.engine_args
    assert ns is not None
    if getattr(ns, "is_embedding", False):
        raise ConfigError(
            "--is-embedding: this module generates text; an embedding model is served by "
            "python -m dynamo_sglang.embedding"
        )
    given: str = getattr(ns, "disaggregation_mode", None) or "null"
    if role is None:
        if given not in ("null", "prefill", "decode"):
            raise ConfigError(f"--disaggregation-mode {given}: expected null, prefill or decode")
        return given  # type: ignore[return-value]
    explicit = parsed.engine_sources.get("disaggregation_mode", "default") != "default"
    if explicit and given != role:
        raise ConfigError(
            f"--disaggregation-mode {given} contradicts this module, which runs a {role} worker "
            f"(use dynamo_sglang.worker to choose the mode by flag)"
        )
    ns.disaggregation_mode = role
    return role


def resolve_embedding(parsed: ParsedArgs[SglangConfig]) -> Mode:
    """The embedding role: SGLang's `--is-embedding` on (a `*ForCausalLM` model then serves its
    last token's hidden state), aggregated (an embedding has no decode leg to hand over to)."""
    ns = parsed.engine_args
    assert ns is not None
    given = getattr(ns, "disaggregation_mode", None) or "null"
    if given != "null":
        raise ConfigError(
            f"--disaggregation-mode {given}: an embedding worker serves whole requests "
            "(leave the flag out)"
        )
    ns.is_embedding = True
    return "null"


def server_args_from(parsed: ParsedArgs[SglangConfig]) -> Any:
    """SGLang's `ServerArgs` from the merged flags (`ServerArgs.from_cli_args`)."""
    from sglang.srt.server_args import ServerArgs

    assert parsed.engine_args is not None
    return ServerArgs.from_cli_args(parsed.engine_args)
