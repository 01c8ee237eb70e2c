"""The config classes dynamo-vllm reads (vllm/config/*.py): `KVEventsConfig`, `KVTransferConfig`,
and the `VllmConfig` an engine exposes (`model_config.max_model_len`, `cache_config.block_size`,
`cache_config.num_gpu_blocks`, `model_config.get_diff_sampling_param()`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            self.publisher = "zmq" if self.enable_kv_cache_events else "null"


@dataclass
class KVTransferConfig:
    kv_connector: str | None = None
    kv_role: str | None = None
    engine_id: str | None = None
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)


def parse_json(cls: type) -> Any:
    def parse(text: str) -> Any:
        return cls(**json.loads(text))

    return parse


@dataclass
class ModelConfig:
    model: str
    served_model_name: str
    max_model_len: int
    generation_config: dict[str, Any] = field(default_factory=dict)
    runner_type: str = "generate"
    """`--runner`, resolved: "pooling" serves `encode` (and the embed task), "generate" does not."""
    hidden_size: int = 64
    max_logprobs: int = 20
    """`--max-logprobs`: the most (prompt) logprobs a request may ask for."""
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None

    @property
    def embedding_size(self) -> int:
        return self.hidden_size

    def get_diff_sampling_param(self) -> dict[str, Any]:
        return dict(self.generation_config)


@dataclass
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None


@dataclass
class VllmConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    kv_transfer_config: KVTransferConfig | None = None
    kv_events_config: KVEventsConfig | None = None
