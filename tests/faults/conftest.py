"""A graph of real processes for each fault case: frontend + mocker workers (file discovery in
the test's own folder, its own namespace and ports), every process stopped by the test.

`BOUND` is the heartbeat timeout the graph runs with (`DYN_HEARTBEAT_TIMEOUT`): a hung or cut-off
worker must be detected within it. The mocker runs slowly (`SPEEDUP`) so that streams last a
few seconds and a fault lands in the middle of them.
"""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.testing.procs import Proc, run_python
from dynamo_core.testing.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "models" / "tiny"
BOUND = 3.0
SPEEDUP = "0.25"


class Graph:
    """A frontend and its workers, as processes."""

    def __init__(self, stack: ExitStack, tmp: Path, **env: str) -> None:
        self.stack = stack
        self.namespace = "f" + uuid.uuid4().hex[:10]
        self.env = {
            "DYN_FILE_KV": str(tmp / "kv"),
            "DYN_NAMESPACE": self.namespace,
            "DYN_DISCOVERY_BACKEND": "file",
            "DYN_REQUEST_PLANE": "tcp",
            "DYN_HEARTBEAT_TIMEOUT": str(BOUND),
            **env,
        }
        self.workers: list[Proc] = []
        self.frontend: Proc | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_worker(self, *args: str, **env: str) -> Proc:
        argv = ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--speedup-ratio", SPEEDUP]
        proc = self.stack.enter_context(run_python([*argv, *args], env={**self.env, **env}))
        self.workers.append(proc)
        proc.wait_for_line("/generate as instance", timeout=60)
        return proc

    def start_frontend(self, *args: str, **env: str) -> Proc:
        self.port = free_port()
        argv = ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1"]
        argv += ["--http-port", str(self.port), *args]
        self.frontend = self.stack.enter_context(run_python(argv, env={**self.env, **env}))
        self.frontend.wait_for_line("OpenAI API on", timeout=60)
        return self.frontend

    def frontend_log(self, pattern: str) -> int:
        """How many lines of the frontend's output match `pattern`."""
        assert self.frontend is not None
        return len(re.findall(pattern, self.frontend.output()))

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        return proc.stop(sig, timeout)


@pytest.fixture
def graph(tmp_path: Path) -> Iterator[Graph]:
    with ExitStack() as stack:
        yield Graph(stack, tmp_path)


_REPORTS: list[str] = []


def report(case: str, counts: dict[str, object]) -> None:
    """Record one line per case with its counts; they are printed at the end of the run."""
    _REPORTS.append(f"{case}: " + " ".join(f"{k}={v}" for k, v in counts.items()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORTS:
        terminalreporter.section("fault counts")
        for line in _REPORTS:
            terminalreporter.write_line(line)
