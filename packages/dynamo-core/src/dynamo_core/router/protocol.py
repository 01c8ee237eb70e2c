"""The router service's wire messages (`python -m dynamo_core.router`), msgspec structs.

A frontend asks for a worker with one `RouteRequest` on the service's `route` endpoint, and
keeps that stream open while the request runs: the first item is a `RouteReply` (`queued`: the
pool is busy and the request waits in the service's admission queue; the decision follows), the
next one the decision; closing the stream tells the service the request ended. First tokens go
in batches to the `mark` endpoint (`MarkRequest`), one message per frontend loop iteration.
"""

from __future__ import annotations

import msgspec

__all__ = ["MarkRequest", "RouteReply", "RouteRequest"]


class RouteRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A worker for these tokens, please."""

    endpoint: str
    """The workers' "namespace.component.endpoint", as their model card names it."""
    block_size: int
    """Their KV block size (the card's), for a kv router's index."""
    token_ids: list[int]
    instances: list[int]
    """The candidates the frontend sees (live, with a model card)."""
    request_id: str
    exclude: list[int] = msgspec.field(default_factory=list)
    """Instances that just failed this request: a retry, which admission does not hold up."""
    session: str | None = None
    """The client's session (`X-Dynamo-Session-ID`): its requests go to one worker."""


class RouteReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    instance_id: int | None = None
    queued: bool = False


class MarkRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Requests (by id) whose first token arrived: their prefill is done."""

    first_token: list[str] = msgspec.field(default_factory=list)
