"""The replay half of vLLM's and SGLang's `ZmqEventPublisher`, for the engines' fakes.

Both engines keep their last `buffer_steps` KV event batches and serve them on a ROUTER socket
bound at `replay_endpoint`, from their publisher thread: a request is `(identity, b"", start)`
(start: 8 bytes big-endian), the answer one message `(identity, b"", seq, payload)` per kept
batch from `start` on, then `(identity, b"", -1 as 8 signed bytes, b"")`. A fake publisher
`keep`s each batch it publishes here; `dynamo_core.llm.kv_relay.fetch_engine_replay` is the
client the workers' relays use. `PublisherSockets` is the rest of such a publisher's sockets:
the PUB socket, the sequence numbers, and `drop_live` to keep some batches out of the live stream
(what a PUB socket drops for a lagging subscriber) while they stay replayable.
"""

from __future__ import annotations

import threading
from collections import deque
from itertools import count
from typing import Any

__all__ = ["PublisherSockets", "ReplaySocket"]

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class ReplaySocket:
    """Serves the batches `keep` was given on a ROUTER bound at `endpoint`, from a thread."""

    def __init__(self, context: Any, endpoint: str, buffer_steps: int = 10_000) -> None:
        import zmq

        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.replays = 0
        """Requests answered."""
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="fake-kv-replay", daemon=True)
        self._thread.start()

    def keep(self, seq: int, payload: bytes) -> None:
        self._buffer.append((seq, payload))

    def _serve(self) -> None:
        sock = self._socket
        while self._running:
            if not sock.poll(50):
                continue
            frames = sock.recv_multipart()
            if len(frames) != 3:
                continue  # the engines ignore a malformed request too
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            for seq, payload in list(self._buffer):  # a copy: publishing goes on meanwhile
                if seq >= start:
                    sock.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            sock.send_multipart((client, b"", END_SEQ, b""))
            self.replays += 1

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self._socket.close(0)


class PublisherSockets:
    """A fake engine publisher's sockets: PUB at `endpoint` (bound when `bind`, as the engine
    decides), and a `ReplaySocket` at `replay_endpoint` if given."""

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool,
        topic: str = "",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
    ) -> None:
        import zmq

        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        if bind:
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self._topic = topic.encode()
        self._seq = count()
        self.drop_live: set[int] = set()
        self.replay = (
            None
            if replay_endpoint is None
            else ReplaySocket(self._ctx, replay_endpoint, buffer_steps)
        )

    def send(self, payload: bytes) -> None:
        """One batch: the next sequence number, kept for replay, sent live unless dropped."""
        seq = next(self._seq)
        if self.replay is not None:
            self.replay.keep(seq, payload)
        if seq not in self.drop_live:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))

    def close(self) -> None:
        if self.replay is not None:
            self.replay.close()
        self._pub.close(0)
        self._ctx.term()
