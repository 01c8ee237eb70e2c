"""`dynamo serve` supervision, exactly: a worker that always fails is started exactly N times
and each exit is reported once with its code; a second graph that would collide with a running
one (its HTTP port, or its namespace on this machine) refuses to start with one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, report
from dynamo_core.testing.procs import run_python
from dynamo_core.testing.servers import free_port

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
AGG = str(ROOT / "examples" / "graphs" / "agg.yaml")


def serve_env(tmp_path: Path) -> dict[str, str]:
    return {
        "DYN_FILE_KV": str(tmp_path / "kv"),
        "NO_COLOR": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]),
    }


@pytest.mark.parametrize("n", [3, 5])
def test_always_failing_worker_gives_up_after_exactly_n_starts(tmp_path: Path, n: int) -> None:
    graph = tmp_path / "failing.yaml"
    graph.write_text(
        "components:\n"
        "  frontend: {module: dynamo_core.frontend, args: {http-port: 8000}}\n"
        f"  backend: {{module: fault_fakes.crashing, args: {{model-path: {ROOT}/examples/models/tiny}}}}\n"
    )
    argv = ["-m", "dynamo_serve", "serve", str(graph), "--namespace", "f" + uuid.uuid4().hex[:8]]
    argv += ["--frontend.http-port", str(free_port()), "--max-start-failures", str(n)]
    argv += ["--log-dir", str(tmp_path / "logs")]
    with run_python(argv, env=serve_env(tmp_path), cwd=ROOT) as proc:
        try:
            code = proc.popen.wait(120)
        except subprocess.TimeoutExpired:  # an exit lost, or a start that never ended: show it
            pytest.fail(f"dynamo serve still running after 120 s:\n{proc.output()[-6000:]}")
        proc.stop()
    out = proc.output()
    starts = re.findall(r"^dynamo +\| backend (?:started|restarted): pid (\d+)$", out, re.M)
    exits = re.findall(r"^dynamo +\| backend \(pid (\d+)\) exited with status 3", out, re.M)
    report(f"dynamo serve, always-failing worker, --max-start-failures {n}",
           {"starts": len(starts), "exits_reported": len(exits), "exit": code})  # fmt: skip
    assert code == 1
    assert len(starts) == n, out
    assert exits == starts  # each exit seen, once, with its code, in order
    assert f"{n} time(s) before it became ready: giving up" in out
    assert "graph ready" not in out


def test_second_graph_refuses_with_one_line(tmp_path: Path) -> None:
    env = serve_env(tmp_path)
    port = free_port()
    namespace = "f" + uuid.uuid4().hex[:8]
    first = ["-m", "dynamo_serve", "serve", AGG, "--namespace", namespace]
    first += ["--frontend.http-port", str(port), "--log-dir", str(tmp_path / "logs1")]
    with run_python(first, env=env, cwd=ROOT) as running:
        running.wait_for_line("stop: Ctrl-C", timeout=90)

        def second(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "dynamo_serve", "serve", AGG, *args,
                 "--log-dir", str(tmp_path / "logs2")],
                cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        same = second("--namespace", namespace, "--frontend.http-port", str(free_port()))
        busy = second("--namespace", namespace + "x", "--frontend.http-port", str(port))
        results = {"same_namespace": same.returncode, "busy_port": busy.returncode}
        report("second dynamo serve", results)
        for done in (same, busy):
            assert done.returncode == 2
            assert len(done.stderr.splitlines()) == 1, done.stderr
            assert done.stdout == ""
        assert same.stderr.startswith(
            f"dynamo serve: error: namespace '{namespace}' already runs backend, frontend on "
            f"this machine (dynamo serve pid {running.pid})"
        )
        assert busy.stderr.startswith(
            f"dynamo serve: error: port {port} (frontend's --http-port) is already in use by pid "
        )
        assert not (tmp_path / "logs2").exists()  # nothing started
        assert running.popen.poll() is None  # the first graph was not disturbed
        assert running.stop(signal.SIGTERM, timeout=60) == 0
