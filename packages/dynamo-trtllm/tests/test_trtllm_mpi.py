"""Multi-GPU workers: the MPI world TensorRT-LLM expects, and the Deployment's view of it."""

from __future__ import annotations

import os
import stat
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.errors import ConfigError
from dynamo_core.testing.procs import run_python
from dynamo_trtllm import mpi
from dynamo_trtllm.worker import Deployment
from trtllm_testing import TINY, with_fake_path


class Execd(Exception):
    pass


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], dict[str, str]]]:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake_exec(file: str, args: list[str], env: dict[str, str]) -> None:
        calls.append((file, args, env))
        raise Execd

    monkeypatch.setattr(os, "execvpe", fake_exec)
    monkeypatch.setattr(mpi.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return calls


def test_world_detection() -> None:
    assert not mpi.in_mpi_world({})
    for marker in ("tllm_mpi_size", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", mpi.RELAUNCHED):
        assert mpi.in_mpi_world({marker: "2"})


def test_mpi_command() -> None:
    assert mpi.mpi_command(
        4, "dynamo_trtllm.decode", ["--tensor-parallel-size", "4"], python="py"
    ) == [
        "mpirun",
        "-n",
        "4",
        "--oversubscribe",
        "--allow-run-as-root",
        "trtllm-llmapi-launch",
        "py",
        "-m",
        "dynamo_trtllm.decode",
        "--tensor-parallel-size",
        "4",
    ]


def test_relaunch_only_when_needed(execs: list[Any]) -> None:
    mpi.maybe_relaunch(1, "mpirun", "m", [], environ={})
    mpi.maybe_relaunch(2, "spawn", "m", [], environ={})
    mpi.maybe_relaunch(2, "mpirun", "m", [], environ={"tllm_mpi_size": "2"})
    assert execs == []
    with pytest.raises(Execd):
        mpi.maybe_relaunch(2, "mpirun", "m", ["--x"], environ={"A": "1"})
    (file, args, env) = execs[0]
    assert file == "mpirun" and args == mpi.mpi_command(2, "m", ["--x"])
    assert env == {"A": "1", mpi.RELAUNCHED: "1"}


def test_relaunch_needs_mpirun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpi.shutil, "which", lambda tool: None)
    with pytest.raises(ConfigError, match="mpirun and trtllm-llmapi-launch are not on PATH"):
        mpi.maybe_relaunch(2, "mpirun", "m", [], environ={})


def test_worker_main_relaunches_itself(
    execs: list[Any], fake_trtllm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynamo_trtllm import worker

    for marker in mpi.WORLD_MARKERS:
        monkeypatch.delenv(marker, raising=False)
    argv = [
        "--model-path",
        str(TINY),
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "2",
    ]
    with pytest.raises(Execd):
        worker.main(argv)
    (_, args, _) = execs[0]
    assert args == mpi.mpi_command(4, "dynamo_trtllm.worker", argv, python=sys.executable)


def test_deployment_resources_follow_parallelism() -> None:
    assert Deployment.name == "trtllm-worker" and Deployment.resources.gpu == 1
    args = {"model-path": "m", "tensor-parallel-size": 2, "pipeline_parallel_size": 2}
    assert Deployment.resources_for(args).gpu == 4
    assert Deployment.launch_prefix(args) == mpi.launch_prefix(4)
    assert Deployment.launch_prefix({"tensor-parallel-size": 1}) == []
    assert Deployment.launch_prefix({**args, "mpi-launcher": "spawn"}) == []


FAKE_MPIRUN = """#!/bin/sh
# fake mpirun: drop the options up to the command, which becomes rank 0 of an N-rank world
while [ "$1" != "trtllm-llmapi-launch" ]; do
  if [ "$1" = "-n" ]; then shift; N="$1"; fi
  shift
done
shift
export tllm_mpi_size="$N" TLLM_SPAWN_PROXY_PROCESS=1
echo "fake mpirun: $N ranks: $*"
exec "$@"
"""


def test_relaunched_worker_serves(tmp_path: Path, proc_env: dict[str, str]) -> None:
    """The printed `python -m dynamo_trtllm.worker --tensor-parallel-size 2` works: the worker
    re-runs itself under (a fake) mpirun and trtllm-llmapi-launch, then serves."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("mpirun", FAKE_MPIRUN), ("trtllm-llmapi-launch", '#!/bin/sh\nexec "$@"\n')):
        script = bin_dir / name
        script.write_text(text)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = with_fake_path({**proc_env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    with ExitStack() as stack:
        proc = stack.enter_context(
            run_python(
                [
                    "-m",
                    "dynamo_trtllm.worker",
                    "--model-path",
                    str(TINY),
                    "--tensor-parallel-size",
                    "2",
                ],
                env=env,
            )
        )
        proc.wait_for_line("/generate as instance", timeout=30)
        out = proc.output()
        assert "re-running under MPI (2 ranks)" in out
        assert "fake mpirun: 2 ranks:" in out and "-m dynamo_trtllm.worker" in out
