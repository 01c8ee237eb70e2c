"""The frontend's view of live models, kept current by a discovery watch on model cards.

A model appears when its first card is registered and its tokenizer is loaded (in a thread, once
per model), and disappears when its last card goes (its instances stopped or died). Requests are
routed only to instances that have both a card and a live endpoint registration. Each model's
routing is a `Router` from `dynamo_core.router.make_router` (the router package owns the policy,
admission control and the workers' event feed); the frontend only composes it.

A name is one kind of model: an embedding model (card type `embedding`) or a text-generation
one. A card that names a model already served as the other kind is left out (logged): its
workers would get requests they cannot serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from dynamo_core.errors import ConfigError, NoInstancesError
from dynamo_core.llm.chat_template import ChatTemplate
from dynamo_core.llm.model_card import ModelCard, fetch_model_files
from dynamo_core.llm.parsers import ParserSpec
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.router import (
    LocalRouter,
    Route,
    Router,
    RouterConfig,
    make_policy,
    make_router,
)
from dynamo_core.runtime.discovery.keys import models_prefix

if TYPE_CHECKING:
    from dynamo_core.runtime import Client, DistributedRuntime
    from dynamo_core.runtime.discovery import Watch

__all__ = ["ModelEntry", "ModelManager", "PrefillPool"]

log = logging.getLogger("dynamo.frontend.models")


@dataclass
class PrefillPool:
    """A model's prefill workers (cards with model type `prefill`)."""

    name: str
    card: ModelCard
    client: Client
    card_instances: set[int] = field(default_factory=set)
    #: round-robin over the prefill workers (set by `ModelManager` when the pool is made)
    router: Router = field(init=False)

    def live_instances(self) -> list[int]:
        return [i for i in self.client.instance_ids() if i in self.card_instances]


@dataclass
class ModelEntry:
    name: str
    card: ModelCard
    tokenizer: Tokenizer
    template: ChatTemplate
    client: Client
    card_instances: set[int] = field(default_factory=set)
    created: int = 0
    #: the parsers of its output: its card's, or the frontend's overrides
    parsers: ParserSpec = field(default_factory=ParserSpec)
    #: the model's routing and admission (set by `ModelManager` when the entry is made)
    router: Router = field(init=False)

    def live_instances(self) -> list[int]:
        return [i for i in self.client.instance_ids() if i in self.card_instances]

    async def route(
        self,
        token_ids: Sequence[int],
        exclude: Sequence[int],
        request_id: str | None,
        session: str | None = None,
    ) -> Route:
        """A live instance for a request (not one of `exclude`; the session's own worker for a
        request of a session), counted there by the model's router; `NoInstancesError` naming
        the model when none is left."""
        try:
            return await self.router.route(
                token_ids, self.live_instances(), exclude, request_id, session
            )
        except NoInstancesError:
            raise NoInstancesError(f"The model `{self.name}` has no live instances.") from None

    @property
    def eos_token_ids(self) -> list[int]:
        return self.tokenizer.eos_token_ids


class ModelManager:
    def __init__(
        self,
        runtime: DistributedRuntime,
        namespace: str,
        router: RouterConfig | None = None,
        *,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
    ) -> None:
        """`tool_call_parser`, `reasoning_parser`: the frontend's overrides of every card's
        (None: the card's; ``none``: no parser)."""
        self.runtime = runtime
        self.parser_overrides = (tool_call_parser, reasoning_parser)
        self.namespace = namespace
        self.router = router or RouterConfig()
        self.models: dict[str, ModelEntry] = {}
        self.prefill: dict[str, PrefillPool] = {}
        #: models that were served and have no instance now (their requests get 503, not 404)
        self.retired: set[str] = set()
        self._cards: dict[str, tuple[str, ModelCard]] = {}  # key -> (model, card)
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        # a model that comes back (its workers restarted) needs no second tokenizer load
        self._tokenizers: dict[str, tuple[Tokenizer, ChatTemplate]] = {}

    async def start(self) -> None:
        self._watch = await self.runtime.discovery.watch_prefix(models_prefix(self.namespace))
        for event in self._watch.pending():
            self._apply(event.kind, event.key, event.value)
        self._task = self.runtime.spawn(self._follow(self._watch), name="model-watch")
        if self._loading:
            await asyncio.gather(*self._loading.values(), return_exceptions=True)

    async def _follow(self, watch: Watch) -> None:
        async for event in watch:
            self._apply(event.kind, event.key, event.value)

    def _apply(self, kind: str, key: str, value: bytes | None) -> None:
        if kind == "put" and value is not None:
            try:
                card = ModelCard.decode(value)
            except msgspec.DecodeError as exc:
                log.warning("ignoring malformed model card %s: %s", key, exc)
                return
            self._cards[key] = (card.name, card)
            if "prefill" in card.model_type:
                self._add_prefill(card)
                return
            entry = self.models.get(card.name)
            if entry is not None and _embeds(entry.card) != _embeds(card):
                log.warning(
                    "model %s: instance %x registered it as %s model, but it is served as %s "
                    "one here; that instance is left out",
                    card.name,
                    card.instance_id,
                    _kind(card),
                    _kind(entry.card),
                )
            elif entry is not None:
                entry.card_instances.add(card.instance_id)
                self._notify()
            elif card.name not in self._loading:
                self._loading[card.name] = self.runtime.spawn(self._load(card))
        else:
            known = self._cards.pop(key, None)
            if known is None:
                return
            name, card = known
            if "prefill" in card.model_type:
                self._remove_prefill(card)
                return
            entry = self.models.get(name)
            if entry is not None:
                entry.card_instances.discard(card.instance_id)
                if not entry.card_instances:
                    log.info("model %s has no instances left: removed", name)
                    del self.models[name]
                    self.retired.add(name)
                    self.runtime.spawn(entry.router.close())
                    self.runtime.spawn(entry.client.close())
            self._notify()

    def _add_prefill(self, card: ModelCard) -> None:
        pool = self.prefill.get(card.name)
        if pool is not None:
            pool.card_instances.add(card.instance_id)
            self._notify()
            return
        key = f"prefill:{card.name}"
        if key not in self._loading:
            self._loading[key] = self.runtime.spawn(self._load_prefill(card, key))

    async def _load_prefill(self, card: ModelCard, key: str) -> None:
        try:
            client = await self.runtime.endpoint(card.endpoint).client()
        finally:
            self._loading.pop(key, None)
        instances = {
            c.instance_id
            for (name, c) in self._cards.values()
            if name == card.name and "prefill" in c.model_type
        }
        pool = PrefillPool(card.name, card, client, instances)
        pool.router = LocalRouter(make_policy("round-robin"), pool.live_instances)
        self.prefill[card.name] = pool
        log.info("model %s: prefill workers at %s (disaggregated)", card.name, card.endpoint)
        client.on_change(self._notify)
        self._notify()

    def _remove_prefill(self, card: ModelCard) -> None:
        pool = self.prefill.get(card.name)
        if pool is None:
            return
        pool.card_instances.discard(card.instance_id)
        if not pool.card_instances:
            del self.prefill[card.name]
            log.info("model %s: no prefill workers left (aggregated)", card.name)
            self.runtime.spawn(pool.client.close())
        self._notify()

    def prefill_pool(self, name: str) -> PrefillPool | None:
        """The model's prefill workers, if it has live ones."""
        pool = self.prefill.get(name)
        return pool if pool is not None and pool.live_instances() else None

    async def _load(self, card: ModelCard) -> None:
        try:
            key = card.model_path + "|" + ",".join(sorted(card.files.values()))
            loaded = self._tokenizers.get(key)
            if loaded is None:
                # the worker's folder, if this machine has the same files; else fetched from it
                folder = await fetch_model_files(self.runtime, card)
                loaded = await asyncio.to_thread(_load_tokenizer, str(folder))
                self._tokenizers[key] = loaded
            tokenizer, template = loaded
            client = await self.runtime.endpoint(card.endpoint).client()
        except Exception as exc:
            log.error("cannot serve model %s: %s", card.name, exc)
            return
        finally:
            self._loading.pop(card.name, None)
        instances = {
            c.instance_id
            for (name, c) in self._cards.values()
            if name == card.name and "prefill" not in c.model_type and _embeds(c) == _embeds(card)
        }
        if not instances:
            await client.close()
            return
        entry = ModelEntry(
            name=card.name,
            card=card,
            tokenizer=tokenizer,
            template=template,
            client=client,
            card_instances=instances,
            created=int(time.time()),
            parsers=self._parsers_for(card),
        )
        entry.router = await make_router(
            self.router,
            self.runtime,
            endpoint=card.endpoint,
            block_size=card.kv_block_size,
            client=client,
            instances=entry.live_instances,
        )
        self.models[card.name] = entry
        self.retired.discard(card.name)
        log.info("model %s added (endpoint %s)", card.name, card.endpoint)
        client.on_change(self._notify)
        self._notify()

    def _parsers_for(self, card: ModelCard) -> ParserSpec:
        """The card's parsers, overridden by the frontend's flags. A name this frontend does
        not know (a newer worker's) is logged, and that parser is off."""
        names = [
            card_name if override is None else (None if override == "none" else override)
            for card_name, override in zip(
                (card.tool_call_parser, card.reasoning_parser), self.parser_overrides, strict=True
            )
        ]
        try:
            spec = ParserSpec(*names)
        except ConfigError as exc:
            log.warning("model %s: %s; its output is not parsed", card.name, exc)
            return ParserSpec()
        if spec.tool_call_parser or spec.reasoning_parser:
            log.info(
                "model %s: tool-call parser %s, reasoning parser %s",
                card.name,
                spec.tool_call_parser,
                spec.reasoning_parser,
            )
        return spec

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    def get(self, name: str) -> ModelEntry | None:
        """The model served as `name`, or else the one that has `name` as an alias (the path
        its worker was started with)."""
        entry = self.models.get(name)
        if entry is None:
            entry = next((m for m in self.models.values() if name in m.card.aliases), None)
        return entry

    def listed(self) -> list[ModelEntry]:
        """Models with at least one live instance."""
        return [m for m in self.models.values() if m.live_instances()]

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        for entry in self.models.values():
            await entry.router.close()
            await entry.client.close()
        for pool in self.prefill.values():
            await pool.client.close()


def _embeds(card: ModelCard) -> bool:
    return "embedding" in card.model_type


def _kind(card: ModelCard) -> str:
    return "an embedding" if _embeds(card) else "a text-generation"


def _load_tokenizer(model_path: str) -> tuple[Tokenizer, ChatTemplate]:
    if not Path(model_path, "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer.json under {model_path}")
    tokenizer = Tokenizer.from_dir(model_path)
    return tokenizer, ChatTemplate.from_tokenizer(tokenizer)
