"""The monorepo's shape: every package alike, one version, test modules that can run together."""

from __future__ import annotations

import re
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = sorted((ROOT / "packages").iterdir())


def test_every_package_has_the_same_skeleton() -> None:
    assert [p.name for p in PACKAGES] == [
        "dynamo-core",
        "dynamo-serve",
        "dynamo-sglang",
        "dynamo-trtllm",
        "dynamo-vllm",
    ]
    for package in PACKAGES:
        module = package.name.replace("-", "_")
        for part in ("pyproject.toml", "README.md", f"src/{module}/__init__.py",
                     f"src/{module}/py.typed", f"src/{module}/_version.py", "tests"):  # fmt: skip
            assert (package / part).exists(), f"{package.name}: no {part}"
        project = tomllib.loads((package / "pyproject.toml").read_text())
        assert project["build-system"]["build-backend"] == "hatchling.build"
        assert project["tool"]["hatch"]["version"]["path"] == f"src/{module}/_version.py"


def test_one_version_for_all() -> None:
    versions = {
        re.search(r'"(.+)"', (p / "src" / p.name.replace("-", "_") / "_version.py").read_text())[1]  # type: ignore[index]
        for p in PACKAGES
    }
    assert len(versions) == 1, versions


def test_engine_packages_depend_on_core_by_range_and_register_as_engines() -> None:
    for name in ("dynamo-sglang", "dynamo-trtllm", "dynamo-vllm"):
        project = tomllib.loads((ROOT / "packages" / name / "pyproject.toml").read_text())[
            "project"
        ]
        core = [d for d in project["dependencies"] if re.match(r"dynamo-core(\[[a-z,]+\])?>=", d)]
        assert len(core) == 1 and "<" in core[0], project["dependencies"]
        engine = name.removeprefix("dynamo-")
        assert engine in project["optional-dependencies"]
        assert project["entry-points"]["dynamo.engines"] == {engine: f"dynamo_{engine}:ENGINE"}


def test_test_module_names_are_unique() -> None:
    # pytest imports test modules by basename: two alike cannot run in one session
    names = Counter(p.name for p in ROOT.glob("packages/*/tests/test_*.py"))
    names.update(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []


def _component_files() -> list[Path]:
    """Every module that defines a component (`class Deployment`): each runs as a script too."""
    return sorted(
        p
        for p in ROOT.glob("packages/*/src/*/**/*.py")
        if re.search(r"^class Deployment\(", p.read_text(), re.MULTILINE)
    )


def _import_names(requirements: list[str]) -> set[str]:
    """The top-level modules the distributions named by `requirements` install here."""
    from importlib.metadata import packages_distributions

    wanted = {
        re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
    }
    return {
        module
        for module, dists in packages_distributions().items()
        if any(d.lower().replace("_", "-") in wanted for d in dists)
    }


def test_every_component_file_runs_as_a_script_unshadowed() -> None:
    """`python3 path/to/module.py` puts the module's folder first on sys.path: no sibling there
    may take the name of a standard-library module or of a dependency the component imports."""
    core = tomllib.loads((ROOT / "packages/dynamo-core/pyproject.toml").read_text())["project"]
    files = _component_files()
    assert len(files) >= 12, files  # frontend, mocker, echo and three roles per engine
    for path in files:
        text = path.read_text()
        assert 'if __name__ == "__main__":' in text, f"{path}: no __main__ guard"
        package = path.relative_to(ROOT / "packages").parts[0]
        project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())
        taken = set(sys.stdlib_module_names) | _import_names(
            project["project"]["dependencies"] + core["dependencies"]
        )
        siblings = {p.stem for p in path.parent.glob("*.py")} | {
            p.name for p in path.parent.iterdir() if (p / "__init__.py").exists()
        }
        assert not siblings & taken, f"{path}: its folder shadows {sorted(siblings & taken)}"


def test_no_asyncio_wait_for_in_library_code() -> None:
    # On Python 3.11 `asyncio.wait_for` drops a cancel that arrives as its inner call completes:
    # the task then runs on, and whoever cancelled it to stop waits forever (`dynamo serve` hung
    # in its stop that way). `async with asyncio.timeout(...)` keeps every cancel.
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in ROOT.glob("packages/*/src/**/*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line and "testing" not in p.parts
    ]
    assert offenders == []
