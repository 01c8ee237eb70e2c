"""`EngineArgs`/`AsyncEngineArgs` (vllm/engine/arg_utils.py): a realistic subset of the flags,
declared the way vLLM does (groups, `BooleanOptionalAction`, JSON-typed configs, a flag with
`deprecated=`, which only vLLM's `FlexibleArgumentParser` accepts on Python < 3.13)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm.config import (
    CacheConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    VllmConfig,
    parse_json,
)


@dataclass
class EngineArgs:
    model: str = "Qwen/Qwen3-0.6B"
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    data_parallel_size: int = 1
    data_parallel_rank: int | None = None
    data_parallel_start_rank: int | None = None
    data_parallel_size_local: int | None = None
    data_parallel_backend: str = "mp"
    data_parallel_hybrid_lb: bool = False
    data_parallel_external_lb: bool = False
    enforce_eager: bool = False
    distributed_executor_backend: str | None = None
    max_num_seqs: int | None = None
    seed: int = 0
    kv_transfer_config: KVTransferConfig | None = None
    kv_events_config: KVEventsConfig | None = None
    disable_log_stats: bool = False
    runner: str = "auto"
    convert: str = "auto"

    @staticmethod
    def add_cli_args(parser: Any) -> Any:
        model = parser.add_argument_group(title="ModelConfig", description="Model settings.")
        model.add_argument(
            "--model", type=str, default=EngineArgs.model, help="Model name or path."
        )
        model.add_argument("--served-model-name", nargs="+", type=str, default=None)
        model.add_argument("--tokenizer", type=str, default=None)
        model.add_argument("--revision", type=str, default=None)
        model.add_argument("--tokenizer-revision", type=str, default=None)
        model.add_argument(
            "--dtype",
            choices=["auto", "half", "float16", "bfloat16", "float", "float32"],
            default="auto",
        )
        model.add_argument("--max-model-len", type=int, default=None)
        model.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
        model.add_argument("--seed", type=int, default=0)
        model.add_argument(
            "--runner", choices=["auto", "draft", "generate", "pooling"], default="auto"
        )
        model.add_argument(
            "--convert", choices=["auto", "none", "embed", "classify"], default="auto"
        )
        cache = parser.add_argument_group(title="CacheConfig", description="KV cache settings.")
        cache.add_argument("--block-size", type=int, choices=[1, 8, 16, 32, 64, 128], default=None)
        cache.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        cache.add_argument(
            "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None
        )
        parallel = parser.add_argument_group(title="ParallelConfig")
        parallel.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        parallel.add_argument("--nnodes", "-n", type=int, default=1)
        parallel.add_argument("--node-rank", "-r", type=int, default=0)
        parallel.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        parallel.add_argument("--prefill-context-parallel-size", "-pcp", type=int, default=1)
        parallel.add_argument("--data-parallel-size", "-dp", type=int, default=1)
        parallel.add_argument("--data-parallel-rank", "-dpn", type=int)
        parallel.add_argument("--data-parallel-start-rank", "-dpr", type=int)
        parallel.add_argument("--data-parallel-size-local", "-dpl", type=int)
        parallel.add_argument("--data-parallel-backend", "-dpb", type=str, default="mp")
        for lb in ("hybrid", "external"):
            parallel.add_argument(
                f"--data-parallel-{lb}-lb", f"-dp{lb[0]}",
                action=argparse.BooleanOptionalAction, default=False,
            )  # fmt: skip
        parallel.add_argument(
            "--distributed-executor-backend",
            choices=["ray", "mp", "uni", "external_launcher"],
            default=None,
        )
        scheduler = parser.add_argument_group(title="SchedulerConfig")
        scheduler.add_argument("--max-num-seqs", type=int, default=None)
        vllm_group = parser.add_argument_group(title="VllmConfig")
        vllm_group.add_argument(
            "--kv-transfer-config", type=parse_json(KVTransferConfig), default=None
        )
        vllm_group.add_argument("--kv-events-config", type=parse_json(KVEventsConfig), default=None)
        parser.add_argument(
            "--disable-log-stats", action="store_true", default=False, help="Disable stats."
        )
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        attrs = [attr.name for attr in dataclasses.fields(cls)]
        return cls(**{attr: getattr(args, attr) for attr in attrs if hasattr(args, attr)})

    def create_engine_config(self, usage_context: Any = None) -> VllmConfig:
        folder = Path(self.model)
        config = json.loads((folder / "config.json").read_text()) if folder.is_dir() else {}
        generation = folder / "generation_config.json"
        defaults: dict[str, Any] = {}
        if generation.is_file():
            data = json.loads(generation.read_text())
            defaults = {k: data[k] for k in ("temperature", "top_p", "top_k") if k in data}
        derived = int(config.get("max_position_embeddings", 2048))
        _check_max_model_len(self.max_model_len, derived)
        max_len = self.max_model_len or derived
        names = self.served_model_name
        served = (names[0] if isinstance(names, list) else names) or self.model
        return VllmConfig(
            model_config=ModelConfig(
                self.model,
                served,
                max_len,
                defaults,
                # a *ForCausalLM model runs "generate" unless told "pooling" (then it is converted
                # to an embedding model, vLLM's `--convert auto` for that architecture)
                runner_type="pooling" if self.runner == "pooling" else "generate",
                hidden_size=int(config.get("hidden_size", 64)),
                is_matryoshka=bool(
                    config.get("matryoshka_dimensions") or config.get("is_matryoshka")
                ),
                matryoshka_dimensions=config.get("matryoshka_dimensions"),
            ),
            cache_config=CacheConfig(
                block_size=self.block_size or 16,
                enable_prefix_caching=self.enable_prefix_caching is not False,
            ),
            kv_transfer_config=self.kv_transfer_config,
            kv_events_config=self.kv_events_config,
        )


@dataclass
class AsyncEngineArgs(EngineArgs):
    enable_log_requests: bool = False

    @staticmethod
    def add_cli_args(parser: Any, async_args_only: bool = False) -> Any:
        if not async_args_only:
            parser = EngineArgs.add_cli_args(parser)
        parser.add_argument(
            "--enable-log-requests", action=argparse.BooleanOptionalAction, default=False
        )
        parser.add_argument(
            "--disable-log-requests",
            action=argparse.BooleanOptionalAction,
            default=True,
            deprecated=True,
        )
        return parser


def _check_max_model_len(max_model_len: int | None, derived: int) -> None:
    """vllm/config/model.py (0.11+) rejects a too long max_model_len while building the engine
    config; `ModelConfig` being a pydantic dataclass, it arrives as a `ValidationError` titled
    `ModelConfig` whose message is vLLM's text (the real one goes on with advice)."""
    import pydantic

    @pydantic.dataclasses.dataclass
    class ModelConfig:
        max_model_len: int | None

        @pydantic.model_validator(mode="after")
        def _fits(self) -> ModelConfig:
            if self.max_model_len and self.max_model_len > derived:
                raise ValueError(
                    f"User-specified max_model_len ({self.max_model_len}) is greater than the "
                    f"derived max_model_len (max_position_embeddings={derived} in model's "
                    "config.json). To allow overriding this maximum, set the env var "
                    "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
                )
            return self

    ModelConfig(max_model_len)
