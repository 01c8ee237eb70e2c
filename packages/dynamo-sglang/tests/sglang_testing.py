"""Paths and helpers shared by dynamo-sglang's tests (a uniquely named module, so that it never
clashes with another package's `conftest` when several test trees run together)."""

from __future__ import annotations

import socket
from pathlib import Path

HERE = Path(__file__).parent
#: The fake `sglang` package (SGLang's interface, no model): put on sys.path by `fake_sglang`.
FAKES = HERE / "fakes"
TINY = HERE.parents[2] / "examples" / "models" / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
