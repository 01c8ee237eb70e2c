"""Fake `sglang.srt.server_args`: a subset of SGLang 0.5.23's flags, same names and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class ServerArgs:
    model_path: str
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False
    context_length: int | None = None
    is_embedding: bool = False
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    dp_size: int = 1
    mem_fraction_static: float | None = None
    page_size: int | None = None
    log_level: str = "info"
    incremental_streaming_output: bool = False
    dist_init_addr: str | None = None
    kv_events_config: str | None = None
    disaggregation_mode: str = "null"
    disaggregation_transfer_backend: str = "mooncake"
    disaggregation_bootstrap_port: int = 8998
    grammar_backend: str | None = None
    config: str | None = None

    def resolved_dict(self) -> dict[str, Any]:
        """SGLang resolves `None` settings from the model and hardware (here: page size 1,
        the context length from config.json)."""
        out = dataclasses.asdict(self)
        out["page_size"] = self.page_size or 1
        out["served_model_name"] = self.served_model_name or self.model_path
        if out["context_length"] is None:
            config = Path(self.model_path) / "config.json"
            data = json.loads(config.read_text()) if config.is_file() else {}
            out["context_length"] = int(data.get("max_position_embeddings", 4096))
        return out

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = ServerArgs.__dataclass_fields__
        parser.add_argument(
            "--model-path", "--model", type=str, required=True, help="The model weights path."
        )
        parser.add_argument("--tokenizer-path", type=str, default=None)
        parser.add_argument("--skip-tokenizer-init", action="store_true")
        parser.add_argument("--context-length", type=int, default=None)
        parser.add_argument(
            "--is-embedding",
            action="store_true",
            help="Whether to use a CausalLM as an embedding model.",
        )
        parser.add_argument("--served-model-name", type=str, default=None)
        parser.add_argument("--host", type=str, default=d["host"].default)
        parser.add_argument("--port", type=int, default=d["port"].default)
        parser.add_argument("--tp-size", "--tensor-parallel-size", type=int, default=1)
        parser.add_argument("--dp-size", "--data-parallel-size", type=int, default=1)
        parser.add_argument("--mem-fraction-static", type=float, default=None)
        parser.add_argument("--page-size", type=int, default=None)
        parser.add_argument("--log-level", type=str, default="info")
        parser.add_argument("--incremental-streaming-output", action="store_true")
        parser.add_argument("--dist-init-addr", "--nccl-init-addr", type=str, default=None)
        parser.add_argument("--kv-events-config", type=str, default=None)
        parser.add_argument(
            "--disaggregation-mode", type=str, default="null", choices=["null", "prefill", "decode"]
        )
        parser.add_argument(
            "--disaggregation-transfer-backend",
            type=str,
            default="mooncake",
            choices=["mooncake", "nixl", "ascend", "fake", "mori", "mooncake_tcp"],
        )
        parser.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
        parser.add_argument(
            "--grammar-backend",
            type=str,
            default=None,
            choices=["xgrammar", "outlines", "llguidance", "none"],
        )
        parser.add_argument("--config", type=str, help="Read CLI options from a YAML file.")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        names = [f.name for f in dataclasses.fields(cls) if hasattr(args, f.name)]
        return cls(**{n: getattr(args, n) for n in names})
