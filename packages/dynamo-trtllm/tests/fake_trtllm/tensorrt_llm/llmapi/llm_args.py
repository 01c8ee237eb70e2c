"""`tensorrt_llm.llmapi.llm_args`: the LLM's arguments, pydantic models with `extra="forbid"`
(an unknown key raises `ValidationError` of type `extra_forbidden`, located at the key)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class StrictBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KvCacheConfig(StrictBaseModel):
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = 0.9
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: float | None = None
    secondary_offload_min_priority: int | None = None
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    dtype: str = "auto"
    tokens_per_block: int = 32


class TorchLlmArgs(StrictBaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str
    tokenizer: Any = None
    tokenizer_mode: Literal["auto", "slow"] = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    revision: str | None = None
    tokenizer_revision: str | None = None
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    gpus_per_node: int | None = None
    moe_expert_parallel_size: int | None = None
    moe_tensor_parallel_size: int | None = None
    enable_attention_dp: bool = False
    backend: str | None = None
    max_batch_size: int | None = 2048
    max_num_tokens: int | None = 8192
    max_seq_len: int | None = None
    max_input_len: int | None = None
    max_beam_width: int | None = 1
    kv_cache_config: KvCacheConfig = KvCacheConfig()
    enable_chunked_prefill: bool = False
    guided_decoding_backend: Literal["xgrammar", "llguidance"] | None = None
    enable_iter_perf_stats: bool = False
    return_perf_metrics: bool = False
    disable_overlap_scheduler: bool = False
    cuda_graph_config: dict[str, Any] | None = None
    cache_transceiver_config: dict[str, Any] | None = None
    scheduler_config: dict[str, Any] | None = None
    speculative_config: dict[str, Any] | None = None
    attn_backend: str = "TRTLLM"
    print_iter_log: bool = False
    stream_interval: int = 1
