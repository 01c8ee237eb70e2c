"""`dynamo serve` running real processes (the fake components of `serve_fakes`, so only
dynamo-core is needed): readiness, restarts with backoff, giving up on a component that cannot
start, log files, and the stop guarantees (nothing left behind, even a process that escaped its
group and ignores SIGTERM, even when `dynamo serve` itself is killed)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dynamo_core.testing.procs import Proc, run_python

HERE = Path(__file__).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
    return out


def descendants(pid: int) -> set[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return set()


@pytest.fixture
def graph_file(tmp_path: Path) -> Path:
    path = tmp_path / "graph.yaml"
    path.write_text(
        "components:\n"
        "  frontend: {module: serve_fakes.front, args: {http-port: 8000}}\n"
        "  backend: {module: serve_fakes.worker, replicas: 2, args: {model-path: m}}\n"
    )
    return path


@pytest.fixture
def serve(tmp_path: Path, graph_file: Path) -> Iterator[object]:
    seen: set[int] = set()

    @contextlib.contextmanager
    def start(*extra: str, graph: Path = graph_file) -> Iterator[Proc]:
        env = {
            "DYN_FILE_KV": str(tmp_path / "kv"),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "NO_COLOR": "1",
        }
        argv = [
            "-m",
            "dynamo_serve",
            "serve",
            str(graph),
            "--namespace",
            "t" + uuid.uuid4().hex[:8],
        ]
        argv += ["--frontend.http-port", str(free_port()), "--log-dir", str(tmp_path / "logs")]
        with run_python([*argv, *extra], env=env) as proc:
            try:
                yield proc
            finally:
                seen.update(descendants(proc.pid))
                proc.stop(signal.SIGTERM, timeout=30)

    yield start
    leaked = alive(seen)
    for pid in leaked:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert not leaked, f"left behind: {leaked}"


def pid_in(line: str) -> int:
    match = re.search(r"pid (\d+)", line)
    assert match, line
    return int(match.group(1))


def test_ready_summary_logs_and_restart(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with serve() as proc:
        proc.wait_for_line("stop: Ctrl-C", 30)
        out = proc.output()
        for label in ("frontend", "backend.1", "backend.2"):
            assert re.search(rf"^dynamo +\|   {re.escape(label)} +pid \d+", out, re.M), out
        logs = tmp_path / "logs"
        assert {p.name for p in logs.iterdir()} >= {
            "dynamo.log",
            "frontend.log",
            "backend.1.log",
            "backend.2.log",
        }
        assert "fake worker" in (logs / "backend.1.log").read_text()
        victim = pid_in(proc.wait_for_line("backend.2 ready"))
        os.kill(victim, signal.SIGKILL)
        again = pid_in(proc.wait_for_line("backend.2 ready again", 30))
        assert again != victim
        assert f"backend.2 (pid {victim}) exited with signal SIGKILL; restarting in 0.25s" in (
            proc.output()
        )


def test_component_failing_at_start_stops_the_graph(serve) -> None:  # type: ignore[no-untyped-def]
    with serve("--backend.fail-at-start", "--backend.replicas", "1") as proc:
        assert proc.popen.wait(60) == 1
        out = proc.output()
        assert out.count("backend (pid") == 3
        assert "restarting in 0.25s" in out and "restarting in 0.5s" in out  # backoff
        assert "3 time(s) before it became ready: giving up" in out
        assert re.search(r"^dynamo +\|     failing at start as asked$", out, re.M)  # its last words
        assert "graph ready" not in out


def test_a_configuration_error_stops_the_graph_at_once(serve) -> None:  # type: ignore[no-untyped-def]
    why = "max-model-len 4096 is more than the model's 2048 (max_position_embeddings)"
    with serve("--backend.config-error", why, "--backend.replicas", "1") as proc:
        assert proc.popen.wait(60) == 1
        out = proc.output()
    assert out.count(why) == 1, out  # said once, by the worker; never restarted
    assert "backend (pid" in out and "configuration error (status 78): stopping the graph" in out
    assert "restarting" not in out and "graph ready" not in out


def test_straggler_out_of_group_is_swept(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    graph = tmp_path / "forker.yaml"
    graph.write_text(
        "components:\n"
        "  frontend: {module: serve_fakes.front, args: {http-port: 8000}}\n"
        "  backend: {module: serve_fakes.forker, args: {model-path: m}}\n"
    )
    with serve("--grace-period", "2", graph=graph) as proc:
        proc.wait_for_line("stop: Ctrl-C", 30)
        helper = pid_in(proc.wait_for_line("helper pid"))
        assert os.getpgid(helper) == helper  # out of the worker's group
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.popen.wait(30) == 0
        assert not alive({helper})
        assert f"killed 1 leftover process(es): [{helper}]" in proc.output()


def test_killing_the_launcher_still_stops_its_children(serve) -> None:  # type: ignore[no-untyped-def]
    with serve() as proc:
        proc.wait_for_line("stop: Ctrl-C", 30)
        children = {p.pid for p in psutil.Process(proc.pid).children()}
        assert len(children) == 3
        os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)
        _gone, still = psutil.wait_procs([psutil.Process(p) for p in alive(children)], timeout=20)
        assert not still  # PR_SET_PDEATHSIG: the kernel sent them SIGTERM
