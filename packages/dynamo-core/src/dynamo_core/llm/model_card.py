"""`ModelCard` and `register_model`: how a worker tells frontends what it serves.

A worker calls `register_model(endpoint, ...)` before (or while) serving its endpoint. The card
is stored in discovery at `v1/models/{namespace}/{model}/{instance_id:x}/{endpoint}` (`model_key`,
from `dynamo_core.runtime.discovery.keys`, where every key layout lives), bound to the
endpoint's registration: it disappears when the endpoint stops or the process dies, so a model
is listed exactly while at least one instance serves it.

The card names the tokenizer files by path (`model_path`) and by content (`files`: name ->
SHA-256). A frontend on the same machine, or with the same files mounted, loads them from there.
A frontend elsewhere fetches them from the worker itself: `register_model` also serves the
files on the component's `model_files` endpoint (streamed in chunks, so they fit any request
plane's message size), and `fetch_model_files` writes them into a local cache keyed by their
digests. No shared file system, no hub.

What a model is for is its card's `model_type`: `chat` and `completions` (token generation, the
default), `embedding` (vectors, `/v1/embeddings`; its `embedding` says their size and whether
they may be shortened) or `prefill` (a disaggregated model's prefill pool). The frontend
answers a route the model does not serve with a 400 that says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from dynamo_core.args import DEFAULT_MIGRATION_LIMIT
from dynamo_core.errors import ConfigError
from dynamo_core.llm.parsers import ParserSpec
from dynamo_core.runtime.discovery.keys import MODELS, model_key

if TYPE_CHECKING:
    from dynamo_core.runtime import DistributedRuntime, Endpoint

__all__ = [
    "MODELS_PREFIX",
    "MODEL_FILES",
    "EmbeddingSpec",
    "ModelCard",
    "ModelType",
    "fetch_model_files",
    "model_key",
    "register_model",
]

log = logging.getLogger("dynamo.llm.model_card")

#: What a frontend needs of a model: tokenizer, chat template, limits.
MODEL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
FILES_ENDPOINT = "model_files"
_CHUNK = 256 * 1024

MODELS_PREFIX = MODELS
ModelType = Literal["chat", "completions", "embedding", "prefill"]
"""`prefill`: the card of a prefill worker; the frontend then disaggregates that model."""


class EmbeddingSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The vectors an embedding model makes (the card of a model of type `embedding`)."""

    size: int
    """Values per vector."""
    matryoshka: bool = False
    """The model may shorten its vectors (OpenAI's `dimensions`): Matryoshka training, or an
    engine that truncates and renormalises (the mocker)."""
    matryoshka_dimensions: list[int] | None = None
    """The lengths it may shorten them to (None: any from 1 to `size`)."""

    def check_dimensions(self, dimensions: int) -> str | None:
        """Why `dimensions` cannot be served (a message for the client), or None."""
        if not self.matryoshka:
            return "This model does not support specifying dimensions."
        if not 1 <= dimensions <= self.size:
            return f"dimensions must be between 1 and {self.size} for this model"
        allowed = self.matryoshka_dimensions
        if allowed is not None and dimensions not in allowed:
            return f"dimensions must be one of {sorted(allowed)} for this model"
        return None


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
    migration_limit: int = DEFAULT_MIGRATION_LIMIT
    """How often the frontend may move a broken stream to another instance (it may lower it)."""
    instance_id: int = 0
    files: dict[str, str] = msgspec.field(default_factory=dict)
    """The model files the worker serves on `model_files`, name -> SHA-256."""
    extra: dict[str, object] = msgspec.field(default_factory=dict)
    aliases: list[str] = msgspec.field(default_factory=list)
    """Other names clients may send for this model: the path the worker was started with (as
    given and resolved), so a request naming it is served. `/v1/models` lists `name` only."""
    tool_call_parser: str | None = None
    """The worker's `--dyn-tool-call-parser`: how the frontend finds tool calls in the output."""
    reasoning_parser: str | None = None
    """The worker's `--dyn-reasoning-parser`: how the frontend splits reasoning from content."""
    embedding: EmbeddingSpec | None = None
    """An embedding model's vectors (set with model type `embedding`)."""

    def serves(self, model_type: ModelType) -> bool:
        return model_type in self.model_type

    def parser_spec(self) -> ParserSpec:
        """The card's parsers (a `ConfigError` names a parser this frontend does not know)."""
        return ParserSpec(self.tool_call_parser, self.reasoning_parser)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> ModelCard:
        return msgspec.json.decode(data, type=cls)


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


def _inspect_model_path(model_path: str | Path) -> tuple[Path, int | None, dict[str, bytes]]:
    path = Path(model_path).resolve()
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"--model-path {model_path}: no tokenizer.json in that folder")
    files = {name: (path / name).read_bytes() for name in MODEL_FILES if (path / name).is_file()}
    return path, _context_length_from(path), files


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: What each serving component offers on `model_files`: (instance, component) -> model -> files
_SERVED_FILES: dict[tuple[int, str], dict[str, dict[str, bytes]]] = {}


async def _serve_files(endpoint: Endpoint, model: str, files: dict[str, bytes]) -> None:
    """Offer `files` of `model` on the component's `model_files` endpoint."""
    files_endpoint = endpoint.component.endpoint(FILES_ENDPOINT)
    key = (endpoint.runtime.instance_id, files_endpoint.path)
    models = _SERVED_FILES.setdefault(key, {})
    models[model] = files
    if files_endpoint.path in endpoint.runtime.registry.entries:
        return

    async def model_files(request: Any) -> AsyncIterator[dict[str, Any]]:
        name = request.get("model") if isinstance(request, dict) else None
        chosen = models.get(name) if name is not None else next(iter(models.values()))
        if chosen is None:
            raise ConfigError(f"model {name!r} is not served here")
        for filename, data in chosen.items():
            for offset in range(0, max(len(data), 1), _CHUNK):
                yield {"name": filename, "offset": offset, "data": data[offset : offset + _CHUNK]}

    await files_endpoint.start_serving(model_files)


async def register_model(
    endpoint: Endpoint,
    *,
    model_path: str | Path,
    model_name: str | None = None,
    model_type: list[ModelType] | None = None,
    context_length: int | None = None,
    kv_block_size: int = 16,
    migration_limit: int = DEFAULT_MIGRATION_LIMIT,
    extra: dict[str, object] | None = None,
    aliases: Sequence[str] | None = None,
    parsers: ParserSpec | None = None,
    embedding: EmbeddingSpec | None = None,
) -> ModelCard:
    """Publish a `ModelCard` for `endpoint`, for as long as the endpoint is served.

    `context_length` defaults to the model's config; engines pass their real limit. The model
    is served as `model_name` (default: the folder's name) and also answers to `model_path`
    (as given and resolved) and `aliases` (e.g. the `--model` text an engine was started with).
    `parsers`: the worker's tool-call and reasoning parsers (`ParserFlags.parser_spec()`).
    `embedding`: the vectors of an embedding model (its model type then defaults to
    ``["embedding"]``).
    """
    if model_type and "embedding" in model_type and embedding is None:
        raise ConfigError("an embedding model's card needs its `embedding` (vector size)")
    path, config_length, files = await asyncio.to_thread(_inspect_model_path, model_path)
    runtime = endpoint.runtime
    name = model_name or path.name
    card = ModelCard(
        name=name,
        aliases=sorted({str(model_path), str(path), *(aliases or ())} - {name}),
        endpoint=f"{endpoint.namespace_name}.{endpoint.component.name}.{endpoint.name}",
        model_path=str(path),
        model_type=model_type or (["embedding"] if embedding else ["chat", "completions"]),
        context_length=context_length or config_length or 2048,
        kv_block_size=kv_block_size,
        migration_limit=migration_limit,
        instance_id=runtime.instance_id,
        files={name: _digest(data) for name, data in files.items()},
        extra=extra or {},
        tool_call_parser=parsers.tool_call_parser if parsers else None,
        reasoning_parser=parsers.reasoning_parser if parsers else None,
        embedding=embedding,
    )
    await _serve_files(endpoint, card.name, files)
    await endpoint.register(
        model_key(endpoint.namespace_name, card.name, runtime.instance_id, card.endpoint),
        card.encode(),
    )
    log.info(
        "model %s registered on %s%s: context length %d, KV block size %d",
        card.name,
        card.endpoint,
        " (prefill pool)" if "prefill" in card.model_type else "",
        card.context_length,
        card.kv_block_size,
    )
    return card


def model_cache_dir() -> Path:
    """Where fetched model files are kept (`DYN_MODEL_CACHE`, else a per-user temp folder)."""
    configured = os.environ.get("DYN_MODEL_CACHE")
    if configured:
        return Path(configured)
    user = os.environ.get("USER") or str(os.getuid())
    return Path(tempfile.gettempdir()) / f"dynamo-{user}" / "models"


async def fetch_model_files(
    runtime: DistributedRuntime, card: ModelCard, timeout: float = 60.0
) -> Path:
    """A local folder with the card's model files: its own `model_path` when that holds the
    same files, else a cache folder filled from a worker's `model_files` endpoint."""
    local = Path(card.model_path)
    if await asyncio.to_thread(_matches, local, card.files):
        return local
    if not card.files:
        raise ConfigError(f"model {card.name}: {local} is not here and its worker serves no files")
    key = _digest("".join(f"{n}:{d}" for n, d in sorted(card.files.items())).encode())[:16]
    target = model_cache_dir() / f"{card.name.replace('/', '--')}-{key}"
    if await asyncio.to_thread(_matches, target, card.files):
        return target
    ns, component, _ = card.endpoint.split(".")
    client = await runtime.namespace(ns).component(component).endpoint(FILES_ENDPOINT).client()
    try:
        async with asyncio.timeout(timeout):
            await client.wait_for_instances()
            chunks: dict[str, list[bytes]] = {}
            async for item in await client.direct({"model": card.name}, card.instance_id):
                chunks.setdefault(item["name"], []).append(item["data"])
    finally:
        await client.close()
    files = {name: b"".join(parts) for name, parts in chunks.items()}
    await asyncio.to_thread(_write_checked, target, files, card.files)
    log.info(
        "fetched %d model files of %s from instance %x", len(files), card.name, card.instance_id
    )
    return target


def _matches(folder: Path, digests: dict[str, str]) -> bool:
    if not (folder / "tokenizer.json").is_file():
        return False
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file() or _digest(path.read_bytes()) != digest:
            return False
    return True


def _write_checked(target: Path, files: dict[str, bytes], digests: dict[str, str]) -> None:
    for name, digest in digests.items():
        if name not in files or _digest(files[name]) != digest:
            raise ConfigError(f"model file {name} arrived incomplete or changed")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    try:
        os.replace(tmp, target)
    except OSError:  # another process filled it meanwhile
        for name in files:
            (tmp / name).unlink(missing_ok=True)
        tmp.rmdir()
