"""The monorepo's shape: every package alike, one version, test modules that can run together."""

from __future__ import annotations

import re
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
        assert any(d.startswith("dynamo-core>=") and "<" in d for d in project["dependencies"])
        engine = name.removeprefix("dynamo-")
        assert engine in project["optional-dependencies"]
        assert project["entry-points"]["dynamo.engines"] == {engine: f"dynamo_{engine}:ENGINE"}


def test_test_module_names_are_unique() -> None:
    # pytest imports test modules by basename: two alike cannot run in one session
    names = Counter(p.name for p in ROOT.glob("packages/*/tests/test_*.py"))
    names.update(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
