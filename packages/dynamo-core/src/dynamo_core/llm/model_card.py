"""`ModelCard` and `register_model`: how a worker tells frontends what it serves.

A worker calls `register_model(endpoint, ...)` before (or while) serving its endpoint. The card
is stored in discovery at `v1/models/{namespace}/{model}/{instance_id:x}/{endpoint}`, bound to the
endpoint's registration: it disappears when the endpoint stops or the process dies, so a model
is listed exactly while at least one instance serves it.

The card names the tokenizer files by path (`model_path`): a frontend on the same machine, or one
with the same files mounted, loads the tokenizer and chat template from there. `--model-path` on
the frontend overrides it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from dynamo_core.errors import ConfigError

if TYPE_CHECKING:
    from dynamo_core.runtime import Endpoint

__all__ = ["MODELS_PREFIX", "ModelCard", "ModelType", "model_key", "register_model"]

MODELS_PREFIX = "v1/models/"
ModelType = Literal["chat", "completions", "embedding", "prefill"]
"""`prefill`: the card of a prefill worker; the frontend then disaggregates that model."""


class ModelCard(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    """The served model name (what clients put in `model`)."""
    endpoint: str
    """The endpoint that serves it, `namespace.component.endpoint`."""
    model_path: str
    """Folder with tokenizer.json and tokenizer_config.json."""
    model_type: list[ModelType] = msgspec.field(default_factory=lambda: ["chat", "completions"])
    input_type: Literal["tokens"] = "tokens"
    context_length: int = 2048
    kv_block_size: int = 16
    migration_limit: int = 0
    """How often the frontend may move a broken stream to another instance."""
    instance_id: int = 0
    extra: dict[str, object] = msgspec.field(default_factory=dict)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> ModelCard:
        return msgspec.json.decode(data, type=cls)


def model_key(namespace: str, model: str, instance_id: int, endpoint: str) -> str:
    """Where a card lives: one per (model, instance, endpoint), as one process may serve a
    model on two endpoints (a prefill and a decode role in one process)."""
    # model names may contain '/', as in "org/model": keep the key's shape fixed
    return f"{MODELS_PREFIX}{namespace}/{model.replace('/', '%2F')}/{instance_id:x}/{endpoint}"


def _context_length_from(model_path: Path) -> int | None:
    for name, keys in (
        ("config.json", ("max_position_embeddings", "max_sequence_length", "n_positions")),
        ("tokenizer_config.json", ("model_max_length",)),
    ):
        path = model_path / name
        if path.is_file():
            data = json.loads(path.read_text())
            for key in keys:
                value = data.get(key)
                if isinstance(value, int) and 0 < value < 10**8:
                    return value
    return None


def _inspect_model_path(model_path: str | Path) -> tuple[Path, int | None]:
    path = Path(model_path).resolve()
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"--model-path {model_path}: no tokenizer.json in that folder")
    return path, _context_length_from(path)


async def register_model(
    endpoint: Endpoint,
    *,
    model_path: str | Path,
    model_name: str | None = None,
    model_type: list[ModelType] | None = None,
    context_length: int | None = None,
    kv_block_size: int = 16,
    migration_limit: int = 0,
    extra: dict[str, object] | None = None,
) -> ModelCard:
    """Publish a `ModelCard` for `endpoint`, for as long as the endpoint is served.

    `context_length` defaults to the model's config; engines pass their real limit.
    """
    path, config_length = await asyncio.to_thread(_inspect_model_path, model_path)
    runtime = endpoint.runtime
    card = ModelCard(
        name=model_name or path.name,
        endpoint=f"{endpoint.namespace_name}.{endpoint.component.name}.{endpoint.name}",
        model_path=str(path),
        model_type=model_type or ["chat", "completions"],
        context_length=context_length or config_length or 2048,
        kv_block_size=kv_block_size,
        migration_limit=migration_limit,
        instance_id=runtime.instance_id,
        extra=extra or {},
    )
    await endpoint.register(
        model_key(endpoint.namespace_name, card.name, runtime.instance_id, card.endpoint),
        card.encode(),
    )
    return card
