"""The engine-package conformance kit: what every `dynamo-<engine>` package must be, as tests.

An engine package gets the whole suite by subclassing once, in its `test_<engine>_package.py`:

    from dynamo_core.testing.engine_package import EnginePackageConformance

    class TestVllmPackage(EnginePackageConformance):
        package = "dynamo_vllm"
        roles = {"worker": "vllm-worker", "prefill": "vllm-prefill", "decode": "vllm-decode"}
        sample_args = ["--model", "x", "--max-model-len", "64"]
        help_mentions = ("--migration-limit", "--kv-events")

What it checks, with the engine blocked (`sys.modules[name] = None`, what "not installed" looks
like to Python) in a child process, so it holds where the engine is installed too:

- the public surface: `__all__ == ["ENGINE", "__version__"]`, one version with dynamo-core,
  `ENGINE`'s fields, `ENGINE.load()` giving the aggregated worker, the `dynamo.engines` entry
  point (when the package is installed as a wheel);
- every module of the package imports, and every role's `build_parser()` builds and formats its
  help, without importing the engine;
- `--help` of every role works without the engine: exit 0, the package's own flags listed and
  the extra to install named;
- a role started without the engine exits at once with one line (`ENGINE.not_installed()`'s),
  status 1, nothing on stdout;
- every role file runs as a script (`python3 path/to/<role>.py --help`);
- the calling convention: `worker` is a `@dynamo_worker()` coroutine function (with `.run` and
  `.run_in`), `main` exists, `Deployment` names the role and asks for GPUs;
- the package's adapter (in its `engine` module) is an `EngineAdapter`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from typing import Any, ClassVar

import pytest

from dynamo_core.adapter import EngineAdapter
from dynamo_core.deploy import BaseDeployment
from dynamo_core.engines import ENTRY_POINT_GROUP, EngineSpec, find_engine

__all__ = ["EnginePackageConformance"]


def _blocked_python(
    engine: str, code: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -c code` with `import <engine>` failing, whatever is installed."""
    prelude = f"import sys; sys.modules[{engine!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def _run_module(engine: str, module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -m module argv` with the engine blocked."""
    code = (
        "import runpy\n"
        f"sys.argv = [{module!r}, *{argv!r}]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    return _blocked_python(engine, code)


class EnginePackageConformance:
    """Base test class (see the module docstring); subclass it with the attributes below."""

    #: The package's import name, e.g. "dynamo_vllm".
    package: ClassVar[str]
    #: Role module (under the package) -> its `Deployment.name`.
    roles: ClassVar[dict[str, str]]
    #: Flags a role can be started with (model, limits): used to show the missing engine.
    sample_args: ClassVar[list[str]] = []
    #: Flags `--help` must list even without the engine.
    help_mentions: ClassVar[tuple[str, ...]] = ("--migration-limit", "--component-name")
    #: GPUs one replica of each role asks for.
    gpus: ClassVar[int] = 1

    # -- helpers -----------------------------------------------------------------------------

    @property
    def spec(self) -> EngineSpec:
        spec = importlib.import_module(self.package).ENGINE
        assert isinstance(spec, EngineSpec)
        return spec

    @property
    def engine(self) -> str:
        assert self.spec.import_name, f"{self.package}.ENGINE names no import_name"
        return self.spec.import_name

    def role_modules(self) -> list[str]:
        return [f"{self.package}.{role}" for role in self.roles]

    # -- the public surface ------------------------------------------------------------------

    def test_public_names_and_version(self) -> None:
        import dynamo_core

        package = importlib.import_module(self.package)
        assert package.__all__ == ["ENGINE", "__version__"]
        assert package.__version__ == dynamo_core.__version__

    def test_engine_spec(self) -> None:
        spec = self.spec
        engine = self.package.removeprefix("dynamo_")
        assert spec.name == engine
        assert spec.module == f"{self.package}.worker"
        assert spec.extra == f"dynamo-{engine}[{engine}]"
        assert spec.display_name and spec.import_name
        assert spec.load() is importlib.import_module(f"{self.package}.worker")

    def test_entry_point_when_installed(self) -> None:
        distribution = self.package.replace("_", "-")
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{distribution} is not installed as a wheel")
        names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        assert self.spec.name in names
        assert find_engine(self.spec.name) == self.spec

    # -- without the engine ------------------------------------------------------------------

    def test_every_module_imports_and_every_parser_builds_without_the_engine(self) -> None:
        package = importlib.import_module(self.package)
        modules = [
            info.name
            for info in pkgutil.walk_packages(package.__path__, f"{self.package}.")
            if not info.name.endswith("__main__")
        ]
        code = (
            "import importlib, json\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"for name in {self.role_modules()!r}:\n"
            "    sys.modules[name].build_parser().format_help()\n"
            f"engine = {self.engine!r}\n"
            "loaded = [m for m, v in sys.modules.items()\n"
            "          if (m == engine or m.startswith(engine + '.')) and v is not None]\n"
            "print(json.dumps(loaded))\n"
        )
        done = _blocked_python(self.engine, code)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == []

    def test_help_without_the_engine(self) -> None:
        for module in self.role_modules():
            done = _run_module(self.engine, module, ["--help"])
            assert done.returncode == 0, (module, done.stderr)
            for flag in self.help_mentions:
                assert flag in done.stdout, (module, flag)
            assert self.spec.extra is not None and self.spec.extra in done.stdout, module

    def test_a_missing_engine_is_one_line(self) -> None:
        for module in self.role_modules():
            done = _run_module(self.engine, module, self.sample_args)
            assert done.returncode == 1, (module, done.stderr)
            assert done.stdout == ""
            assert done.stderr.splitlines() == [f"error: {self.spec.not_installed()}"], module

    def test_every_role_file_runs_as_a_script(self) -> None:
        for module in self.role_modules():
            found = importlib.util.find_spec(module)
            assert found is not None and found.origin is not None
            done = subprocess.run(
                [sys.executable, found.origin, "--help"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, (module, done.stderr)
            assert done.stdout.startswith(f"usage: python -m {module} "), done.stdout[:200]

    # -- the recipe --------------------------------------------------------------------------

    def test_calling_convention_and_deployments(self) -> None:
        for role, name in self.roles.items():
            module = importlib.import_module(f"{self.package}.{role}")
            worker: Any = module.worker
            assert inspect.iscoroutinefunction(worker), f"{module.__name__}.worker"
            assert callable(worker.run) and inspect.iscoroutinefunction(worker.run_in)
            assert callable(module.main) and callable(module.build_parser)
            deployment = module.Deployment
            assert issubclass(deployment, BaseDeployment)
            assert deployment.name == name
            assert deployment.resources.gpu == self.gpus

    def test_the_adapter_is_an_engine_adapter(self) -> None:
        engine_module = importlib.import_module(f"{self.package}.engine")
        adapters = [
            value
            for value in vars(engine_module).values()
            if isinstance(value, type)
            and issubclass(value, EngineAdapter)
            and value is not EngineAdapter
            and value.__module__ == engine_module.__name__
        ]
        assert len(adapters) == 1, adapters
        assert not inspect.isabstract(adapters[0])
        for role in self.roles:
            source = inspect.getsource(importlib.import_module(f"{self.package}.{role}"))
            assert f"{adapters[0].__name__}(args" in source, role
