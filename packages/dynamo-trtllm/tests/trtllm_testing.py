"""Paths and helpers shared by this package's tests (a plain module: tests/ is no package)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from dynamo_core.testing.fakes import child_env

HERE = Path(__file__).parent
FAKE = HERE / "fake_trtllm"
REPO = HERE.parents[2]
TINY = REPO / "examples" / "models" / "tiny"


def with_fake_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with the fake `tensorrt_llm` first on PYTHONPATH (child processes)."""
    return child_env(FAKE, env)


def without_fake_path() -> dict[str, str]:
    """PYTHONPATH as the tests were started with, the fake left out (engine missing)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(p for p in parts if Path(p) != FAKE)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
