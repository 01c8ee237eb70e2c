"""`run_component`, the one `main()`: exit statuses and the single lines a user sees, in real
processes (it exits, and sets up the process's logging)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMPONENT = """
import logging
from pydantic import Field
from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.component import run_component
from dynamo_core.engines import EngineSpec
from dynamo_core.errors import ConfigError, EngineError
from dynamo_core.runtime import RuntimeConfig, dynamo_worker

class Cfg(RuntimeConfig):
    what: str = Field("ok", description="What the worker does.")

from dynamo_core.deploy import BaseDeployment

class Deployment(BaseDeployment):
    env = {"FOO": "module", "BAR": "module"}

ENGINE = EngineSpec("fake", "dyn_comp", extra="dynamo-fakeeng[fakeeng]",
                    import_name="fakeeng", display_name="FakeEng")

@dynamo_worker()
async def worker(runtime, args):
    if args.config.what == "engine-error":
        raise EngineError("the engine fell over")
    if args.config.what == "config-error":
        raise ConfigError("no such model")
    logging.getLogger("dynamo.test").info("ran in namespace %s", runtime.config.namespace)
    import os
    logging.getLogger("dynamo.test").debug("FOO=%s", os.environ.get("FOO"))

def before(args, argv):
    if args.config.what == "before":
        raise ConfigError("mpirun is not on PATH")
    print("before_run", argv)

if __name__ == "__main__":
    parser = DynFlexibleArgumentParser(Cfg, prog="dyn_comp")
    run_component(parser, worker, engine=ENGINE, before_run=before)
"""


def _dist(site: Path, name: str, version: str, *lines: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *lines]
    (info / "METADATA").write_text("\n".join(meta) + "\n")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The component, and the engine package's metadata: fakeeng>=1.0 in its `fakeeng` extra,
    a CPU build in its `cpu` extra (listed first), Dynamo's own packages beside them."""
    (tmp_path / "dyn_comp.py").write_text(textwrap.dedent(COMPONENT))
    _dist(tmp_path, "dynamo-fakeeng", "0.1", "Provides-Extra: cpu", "Provides-Extra: fakeeng",
          "Requires-Dist: dynamo-core>=0.1",
          'Requires-Dist: fakeeng-cpu==2.0; extra == "cpu"',
          'Requires-Dist: dynamo-core[zmq]; extra == "fakeeng"',
          'Requires-Dist: fakeeng>=1.0; extra == "fakeeng"')  # fmt: skip
    return tmp_path


def _engine(site: Path, version: str) -> None:
    (site / "fakeeng").mkdir()
    (site / "fakeeng" / "__init__.py").write_text("")
    _dist(site, "fakeeng", version)
    (site / f"fakeeng-{version}.dist-info" / "top_level.txt").write_text("fakeeng\n")


def _run(site: Path, *argv: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env.update(DYN_DISCOVERY_BACKEND="mem", DYN_REQUEST_PLANE="inproc", PYTHONPATH=str(site))
    cmd = ["-c", code, *argv] if code else [str(site / "dyn_comp.py"), *argv]
    return subprocess.run(
        [sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=60, cwd=site
    )


def test_a_bad_flag_is_one_line_and_status_2(site: Path) -> None:
    done = _run(site, "--wat", "x")
    assert done.returncode == 2
    assert (
        done.stderr
        == "dyn_comp: error: unknown flag '--wat' on command line (did you mean '--what'?)\n"
    )


def test_help_needs_no_engine(site: Path) -> None:
    done = _run(site, "--help")
    assert done.returncode == 0 and "--what" in done.stdout


def test_a_missing_engine_is_one_line_and_status_1(site: Path) -> None:
    done = _run(site)
    assert done.returncode == 1
    assert done.stdout == ""
    assert (
        done.stderr
        == 'error: FakeEng is not installed: pip install "fakeeng>=1.0" (or "fakeeng-cpu==2.0")\n'
    )


def test_a_blocked_engine_counts_as_missing(site: Path) -> None:
    _engine(site, "1.2")
    code = "import runpy, sys; sys.modules['fakeeng'] = None; runpy.run_path('dyn_comp.py', run_name='__main__')"
    done = _run(site, code=code)
    assert done.returncode == 1
    assert done.stderr.startswith("error: FakeEng is not installed")


def test_an_engine_outside_the_declared_range_is_one_line(site: Path) -> None:
    _engine(site, "0.9")
    done = _run(site)
    assert done.returncode == 1
    assert done.stderr == (
        "error: FakeEng 0.9 is installed; dynamo-fakeeng needs fakeeng>=1.0: "
        'pip install "fakeeng>=1.0" (or "fakeeng-cpu==2.0")\n'
    )


def test_in_range_it_logs_and_runs_the_hook_then_the_worker(site: Path) -> None:
    _engine(site, "1.2")
    done = _run(site, "--namespace", "ns1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before_run ['--namespace', 'ns1']\n"
    assert " INFO dynamo.test: ran in namespace ns1" in done.stderr


@pytest.mark.parametrize(
    ("what", "status", "line"),
    [
        ("before", 1, "error: mpirun is not on PATH"),
        ("engine-error", 1, "error: the engine fell over"),
        ("config-error", 78, "error: no such model"),
    ],
)
def test_failures_are_one_line_with_their_status(
    site: Path, what: str, status: int, line: str
) -> None:
    _engine(site, "1.2")
    done = _run(site, "--what", what)
    assert done.returncode == status
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("error:")] == [line]
    assert "Traceback" not in done.stderr


def test_a_graph_files_env_reaches_the_process(site: Path) -> None:
    """`--config graph --component X`: the module's Deployment.env < the graph's env < the
    component's env, set in os.environ before logging starts (DYN_LOG: debug works)."""
    _engine(site, "1.2")
    graph = site / "graph.yaml"
    graph.write_text(
        "namespace: from-graph\nenv: {DYN_LOG: debug, FOO: graph}\n"
        "components:\n  w: {module: dyn_comp, env: {FOO: component}}\n"
    )
    done = _run(site, "--config", str(graph), "--component", "w")
    assert done.returncode == 0, done.stderr
    assert " INFO dynamo.test: ran in namespace from-graph" in done.stderr
    assert " DEBUG dynamo.test: FOO=component" in done.stderr
