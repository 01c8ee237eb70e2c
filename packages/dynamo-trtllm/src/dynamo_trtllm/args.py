"""Flags of the TensorRT-LLM workers, and the arguments they become for `tensorrt_llm.LLM(...)`.

TensorRT-LLM's LLM API has no argparse parser to merge (`trtllm-serve` is a click command), so
the engine options users set most are declared here, once, as typed fields (they work, and
`dynamo serve --dry-run` checks them, without TensorRT-LLM installed):

    --model-path  --tensor-parallel-size  --pipeline-parallel-size  --backend
    --max-batch-size  --max-num-tokens  --max-seq-len  --kv-cache-free-gpu-memory-fraction

Everything else goes in `--extra-engine-args FILE.yaml`: a map of `LLM(...)` keyword arguments
(the LLM API's `LlmArgs` fields, as `trtllm-serve --extra_llm_api_options` takes them), e.g.

    enable_chunked_prefill: true
    kv_cache_config: {enable_block_reuse: true, dtype: fp8}
    cuda_graph_config: {max_batch_size: 64}

`llm_kwargs()` merges the three layers, lowest first:

1. what the role needs by default (KV events and iteration stats for the router; a cache
   transceiver for prefill/decode workers), and the flags left at their defaults;
2. the `--extra-engine-args` file;
3. the flags given explicitly (on the command line, in `--config`, or as `DYN_*` variables).

Maps merge key by key, so `kv_cache_config: {dtype: fp8}` in the file and
`--kv-cache-free-gpu-memory-fraction 0.8` both reach `KvCacheConfig`. A key the engine rejects is
reported by `engine.start_llm` in one line naming the key and the file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from dynamo_core.adapter import Role, WorkerConfig
from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs, load_yaml_file
from dynamo_core.errors import ConfigError

__all__ = [
    "Role",
    "TrtllmConfig",
    "build_parser",
    "llm_kwargs",
    "load_extra_engine_args",
]

if TYPE_CHECKING:
    from pydantic.config import JsonDict

_ENGINE_GROUP: JsonDict = {"group": "TensorRT-LLM engine (tensorrt_llm.LLM arguments)"}


class TrtllmConfig(WorkerConfig):
    """Flags of `python -m dynamo_trtllm.{worker,prefill,decode}`."""

    model_path: str = Field(
        description="Hugging Face model id or local model folder (tensorrt_llm.LLM(model=...)).",
        json_schema_extra=_ENGINE_GROUP,
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Tensor parallel size (GPUs per pipeline stage).",
        json_schema_extra=_ENGINE_GROUP,
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Pipeline parallel size (stages).", json_schema_extra=_ENGINE_GROUP
    )
    backend: Literal["pytorch", "_autodeploy"] = Field(
        "pytorch", description="LLM API backend.", json_schema_extra=_ENGINE_GROUP
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="Most requests in one batch (engine default if unset).",
        json_schema_extra=_ENGINE_GROUP,
    )
    max_num_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens in one batch (engine default if unset).",
        json_schema_extra=_ENGINE_GROUP,
    )
    max_seq_len: int | None = Field(
        None,
        ge=2,
        description="Longest sequence, prompt plus output (default: the model's).",
        json_schema_extra=_ENGINE_GROUP,
    )
    kv_cache_free_gpu_memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of free GPU memory the KV cache takes (KvCacheConfig; engine default 0.9).",
        json_schema_extra=_ENGINE_GROUP,
    )
    extra_engine_args: Path | None = Field(
        None,
        description="YAML file of further tensorrt_llm.LLM(...) arguments (LlmArgs fields); "
        "explicit flags win over it, it wins over flag defaults.",
        json_schema_extra=_ENGINE_GROUP,
    )

    served_model_name: str | None = Field(
        None, description="Model name clients use (default: the model folder's or id's last part)."
    )
    kv_block_size: int = Field(
        32,
        ge=1,
        description="Tokens per KV cache block, as the engine pages them (TensorRT-LLM's "
        "tokens_per_block, 32 by default): the router hashes blocks of this size.",
    )
    publish_events_and_metrics: bool = Field(
        True,
        description="Publish the engine's KV cache events and load metrics for KV-aware routing "
        "(turns on the engine's KV event buffer and iteration stats).",
    )
    mpi_launcher: Literal["mpirun", "spawn"] = Field(
        "mpirun",
        description="How a worker needing tensor*pipeline > 1 GPUs gets its MPI world when not "
        "started in one: mpirun (re-run itself under 'mpirun -n N ... trtllm-llmapi-launch'), "
        "spawn (let the LLM API spawn its MPI workers; one node only). Under srun or mpirun "
        "(with trtllm-llmapi-launch) nothing is re-launched.",
    )

    @property
    def world_size(self) -> int:
        """GPUs (MPI ranks) one engine instance uses."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


_DESCRIPTIONS: dict[Role, str] = {
    "worker": "A TensorRT-LLM worker (aggregated: prefill and decode in one engine).",
    "prefill": "A TensorRT-LLM prefill worker: runs prompts (context-only requests) and hands "
    "the KV cache to decode workers through DisaggregatedParams.",
    "decode": "A TensorRT-LLM decode worker: continues requests prefilled elsewhere "
    "(generation-only requests), or serves them whole.",
}


def build_parser(role: Role = "worker") -> DynFlexibleArgumentParser[TrtllmConfig]:
    """The parser of `python -m dynamo_trtllm.<role>` (never imports TensorRT-LLM)."""
    return DynFlexibleArgumentParser(
        TrtllmConfig,
        prog=f"python -m dynamo_trtllm.{role}",
        description=f"{_DESCRIPTIONS[role]} Needs TensorRT-LLM: pip install "
        "'dynamo-trtllm[trtllm]' --extra-index-url https://pypi.nvidia.com",
        engine_name="trtllm",
        engine_extra="dynamo-trtllm[trtllm]",
        group="Dynamo",
    )


def load_extra_engine_args(path: Path) -> dict[str, Any]:
    """The `--extra-engine-args` file: a map of `LLM(...)` keyword arguments."""
    data = load_yaml_file(path, "--extra-engine-args")
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(
            f"--extra-engine-args {path}: must hold a map of tensorrt_llm.LLM argument names to values"
        )
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`; maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: Dynamo field -> the `LLM(...)` argument it sets (a dotted name is a key of a nested map).
_ENGINE_FIELDS: dict[str, str] = {
    "model_path": "model",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "backend": "backend",
    "max_batch_size": "max_batch_size",
    "max_num_tokens": "max_num_tokens",
    "max_seq_len": "max_seq_len",
    "kv_cache_free_gpu_memory_fraction": "kv_cache_config.free_gpu_memory_fraction",
}


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _role_defaults(role: Role, config: TrtllmConfig) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    if config.publish_events_and_metrics:
        # KV events need the engine's event buffer (and block reuse); load metrics need its
        # per-iteration stats (get_stats_async).
        defaults["enable_iter_perf_stats"] = True
        defaults["kv_cache_config"] = {"enable_block_reuse": True, "event_buffer_max_size": 1024}
    if role in ("prefill", "decode"):
        # the KV cache moves between workers through the engine's cache transceiver
        defaults["cache_transceiver_config"] = {"backend": "DEFAULT"}
    if role == "prefill":
        # context-only requests are served with the overlap scheduler off (TensorRT-LLM's
        # disaggregated-serving examples)
        defaults["disable_overlap_scheduler"] = True
    return defaults


def llm_kwargs(
    parsed: ParsedArgs[TrtllmConfig] | TrtllmConfig,
    role: Role = "worker",
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """The keyword arguments of `tensorrt_llm.LLM(...)`, and the top-level keys from the file.

    `extra` is the `--extra-engine-args` map (read from `config.extra_engine_args` when None).
    """
    if isinstance(parsed, TrtllmConfig):
        config, sources = parsed, {}
    else:
        config, sources = parsed.config, parsed.sources
    if extra is None:
        extra = (
            load_extra_engine_args(config.extra_engine_args)
            if config.extra_engine_args is not None
            else {}
        )
    defaults = _role_defaults(role, config)
    explicit: dict[str, Any] = {}
    for name, target in _ENGINE_FIELDS.items():
        value = getattr(config, name)
        if value is None:
            continue
        given = sources.get(name, "cli") != "default" or name == "model_path"
        layer = explicit if given else defaults
        layer.update(_merge(layer, _nested(target, value)))
    kwargs = _merge(_merge(defaults, extra), explicit)
    return kwargs, set(extra)
