"""Hosts that are really apart, on one machine: network namespaces joined by veth pairs.

    with network_hosts(["infra", "front", "worker"]) as hosts:
        hosts.address("worker")            # 10.213.0.3
        run_python(hosts.python("worker", ["-m", "dynamo_core.mocker", ...]), env=env)
        hosts.cut("worker")                # its link goes down: packets to and from it are lost
        hosts.heal("worker")

Each role gets a namespace with one interface (`eth0`) whose peer sits on a bridge in a hub
namespace, so the host's own network is never touched and several sets can exist at once (names
carry a random tag). `cut` sets the hub side of a role's link down: a partition in which the
process keeps running and its sockets stay open, the case heartbeats exist for. The file
system is shared, so `file` discovery still works across these hosts.

Needs root (or CAP_NET_ADMIN) and iproute2; where namespaces are refused the test is skipped
with the reason (CI runs as root, so it runs there).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["Hosts", "network_hosts"]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """One namespace per role on a bridge, `<subnet>.<n>/24` with n = 1, 2, ... in role order."""

    def __init__(self, roles: Sequence[str], subnet: str = "10.213.0") -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"dyn{self.tag}hub"
        self.roles = list(roles)
        self.names = {role: f"dyn{self.tag}{i}" for i, role in enumerate(self.roles)}
        self.addresses = {role: f"{subnet}.{i + 1}" for i, role in enumerate(self.roles)}

    def ns(self, role: str) -> str:
        return self.names[role]

    def address(self, role: str) -> str:
        return self.addresses[role]

    def create(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, role in enumerate(self.roles):
            ns = self.names[role]
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)  # fmt: skip
            _ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.hub, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[role]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def destroy(self) -> None:
        for ns in [*self.names.values(), self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def cut(self, role: str) -> None:
        """Partition `role`: its link to the bridge goes down (nothing in or out)."""
        _ip("-n", self.hub, "link", "set", f"p{self.roles.index(role)}", "down")

    def heal(self, role: str) -> None:
        _ip("-n", self.hub, "link", "set", f"p{self.roles.index(role)}", "up")

    def argv(self, role: str, argv: Sequence[str]) -> list[str]:
        """A command line that runs `argv` in `role`'s namespace."""
        return ["ip", "netns", "exec", self.names[role], *argv]

    def python(self, role: str, args: Sequence[str]) -> list[str]:
        """Arguments for `run_python` that run `python ARGS` in `role`'s namespace: a `-c`
        program that replaces itself with `ip netns exec NS python ARGS` (same pid, so the
        test can signal it)."""
        return ["-c", f"import os; os.execvp('ip', {self.argv(role, [sys.executable, *args])!r})"]


@contextmanager
def network_hosts(roles: Sequence[str], subnet: str = "10.213.0") -> Iterator[Hosts]:
    """The namespaces for `roles`, removed on exit; skips the test where they cannot be made."""
    import pytest

    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed: network namespaces cannot be made")
    hosts = Hosts(roles, subnet)
    try:
        hosts.create()
    except OSError as exc:
        hosts.destroy()
        pytest.skip(f"this machine refuses network namespaces ({exc})")
    try:
        yield hosts
    finally:
        hosts.destroy()
