"""Session affinity: the requests of one session go to one worker, where its prefix is cached.

A client names its session in the `X-Dynamo-Session-ID` header (`SESSION_HEADER`, NVIDIA
Dynamo's). Each session has its own order of the live workers, by rendezvous hashing
(highest-random-weight: XXH3-64 of the session id seeded with each worker's id), and its
requests go to the first worker in that order that did not just fail the request and is not
busy (`Admission.busy_among`); without such a worker the routing mode decides as for any request.

Why hashing and not a table of sessions: the order is the same in every frontend process
(`--http-workers`), every frontend replica and the router service, with no state to share,
expire or lose on a restart, and no memory per session (a flood of session ids costs nothing).
When a worker joins or leaves, only the sessions whose first choice it is (or was) move.
The cost is that a session's first request is not placed by load: affinity trades that for
every later turn finding its prefix.

A session id longer than `MAX_SESSION_ID` bytes, or empty, is ignored (the request is routed as
if it had none).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from xxhash import xxh3_64_intdigest

__all__ = ["MAX_SESSION_ID", "SESSION_HEADER", "session_choice", "session_order"]

SESSION_HEADER = "x-dynamo-session-id"
MAX_SESSION_ID = 256
_U64 = (1 << 64) - 1


def session_order(session: str, instances: Sequence[int]) -> list[int]:
    """`instances`, the session's preferred first (rendezvous hashing)."""
    key = session.encode("utf-8", "surrogatepass")
    return sorted(instances, key=lambda w: xxh3_64_intdigest(key, w & _U64), reverse=True)


def session_choice(
    session: str | None, instances: Sequence[int], avoid: Collection[int] = ()
) -> int | None:
    """The session's worker: the first in its order not in `avoid`; None for no session (or
    an id that is not usable) or when every worker is to be avoided."""
    if not session or len(session) > MAX_SESSION_ID:
        return None
    for worker in session_order(session, instances):
        if worker not in avoid:
            return worker
    return None
