"""The pytest plugin every Dynamo test tree shares (entry point `pytest11: dynamo`).

Installed with dynamo-core, so a package's tests (and a user's) get these fixtures without
copying them into their `conftest.py`:

- `namespace`: a fresh Dynamo namespace per test (`t` + 10 hex digits);
- `kv_dir`: a per-test folder for file discovery;
- `proc_env`: the environment for a test's child processes: file discovery in `kv_dir`, the TCP
  request plane, `DYN_NAMESPACE` set to `namespace` (a child started with `--namespace` still
  wins, flags being above the environment);
- `etcd_server`, `nats_server`: real servers on loopback for the session (skipped when the
  binary is missing, failed instead under `DYN_REQUIRE_SERVERS=1`, as CI sets);
- `runtime_config` (parametrized over `mem+inproc`, `file+tcp`, `etcd+tcp`, `etcd+nats`) and
  `runtime`: the same behaviour test on every combination of backends;
- `tiny_model`: the offline test model, `examples/models/tiny` under pytest's root directory.

A fixture of the same name in a `conftest.py` overrides the plugin's, so a suite keeps its own.

**Event loops.** With the ini option `dynamo_uvloop = true` (this repository's `pyproject.toml`
sets it) every async test runs on uvloop, as the components do, through pytest-asyncio's
`pytest_asyncio_loop_factories` hook. Without it the plugin registers no hook at all: an
installed dynamo-core never changes anyone else's event loop (pytest-asyncio treats a hook that
answers "no preference" as an error, so absent is the only inert form).

Importing this module imports neither the runtime nor uvloop: that happens in the fixtures
that need them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_asyncio import fixture as async_fixture
else:
    try:  # a strict-mode suite needs pytest-asyncio's decorator for an async fixture
        from pytest_asyncio import fixture as async_fixture
    except ImportError:  # pragma: no cover - without pytest-asyncio there is no async test
        async_fixture = pytest.fixture

if TYPE_CHECKING:
    from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
    from dynamo_core.testing.servers import EtcdServer, NatsServer

__all__ = [
    "etcd_server",
    "kv_dir",
    "namespace",
    "nats_server",
    "proc_env",
    "runtime",
    "runtime_config",
    "tiny_model",
]

UVLOOP_INI = "dynamo_uvloop"
#: Where the offline test model lives, relative to pytest's root directory.
TINY_MODEL = Path("examples") / "models" / "tiny"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        UVLOOP_INI,
        "Run every async test on uvloop, as Dynamo's components do (dynamo-core's plugin).",
        type="bool",
        default=False,
    )


class _UvloopLoops:
    """pytest-asyncio's loop-factory hook, registered only when `dynamo_uvloop = true`."""

    @pytest.hookimpl(optionalhook=True)
    def pytest_asyncio_loop_factories(
        self, config: pytest.Config, item: pytest.Item
    ) -> Mapping[str, Any]:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


def pytest_configure(config: pytest.Config) -> None:
    if config.getini(UVLOOP_INI):
        config.pluginmanager.register(_UvloopLoops(), "dynamo-uvloop")


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def kv_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "kv"
    folder.mkdir()
    return folder


@pytest.fixture
def proc_env(kv_dir: Path, namespace: str) -> dict[str, str]:
    """Environment for child processes: file discovery in this test's folder, its namespace."""
    return {
        "DYN_FILE_KV": str(kv_dir),
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_NAMESPACE": namespace,
    }


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    from dynamo_core.testing.servers import EtcdServer, require_binary

    require_binary("etcd")
    server = EtcdServer()
    with server:
        yield server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    from dynamo_core.testing.servers import NatsServer, require_binary

    require_binary("nats-server")
    server = NatsServer()
    with server:
        yield server


@pytest.fixture(params=["mem+inproc", "file+tcp", "etcd+tcp", "etcd+nats"])
def runtime_config(request: pytest.FixtureRequest, kv_dir: Path, namespace: str) -> RuntimeConfig:
    """The same behaviour tests run on every combination of backends."""
    from dynamo_core.runtime import RuntimeConfig

    if request.param == "mem+inproc":
        return RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=2)
    if request.param == "file+tcp":
        return RuntimeConfig.model_validate(
            {"file_kv": kv_dir, "namespace": namespace, "graceful_shutdown_timeout": 2}
        )
    etcd: EtcdServer = request.getfixturevalue("etcd_server")
    settings: dict[str, Any] = {
        "discovery_backend": "etcd",
        "etcd_endpoints": etcd.url,
        "namespace": namespace,
        "graceful_shutdown_timeout": 2,
        "lease_ttl": 2,
        "tcp_host": "127.0.0.1",
    }
    if request.param == "etcd+nats":
        nats: NatsServer = request.getfixturevalue("nats_server")
        settings.update(request_plane="nats", event_plane="nats", nats_server=nats.url)
    return RuntimeConfig.model_validate(settings)


@async_fixture
async def runtime(runtime_config: RuntimeConfig) -> AsyncIterator[DistributedRuntime]:
    from dynamo_core.runtime import DistributedRuntime

    rt = await DistributedRuntime.create(runtime_config)
    yield rt
    await rt.shutdown()


@pytest.fixture(scope="session")
def tiny_model(pytestconfig: pytest.Config) -> Path:
    """The offline test model (tokenizer, config, chat template; weights when generated)."""
    path = pytestconfig.rootpath / TINY_MODEL
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"no test model at {path} (run pytest from the repository root)")
    return path
