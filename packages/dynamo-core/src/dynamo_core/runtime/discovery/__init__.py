"""Discovery backends: `mem` (one process), `file` (one machine), `etcd` (many machines)."""

from __future__ import annotations

from dynamo_core.runtime.config import RuntimeConfig

from .base import Discovery, Watch, WatchEvent, new_lease_id

__all__ = ["Discovery", "Watch", "WatchEvent", "new_lease_id", "open_discovery"]


def open_discovery(config: RuntimeConfig) -> Discovery:
    """The discovery backend `config` names (not started yet)."""
    backend = config.discovery_backend
    if backend == "mem":
        from .mem import MemDiscovery

        return MemDiscovery()
    if backend == "file":
        from .file import FileDiscovery

        return FileDiscovery(config.resolved_file_kv())
    if backend == "etcd":
        from .etcd import EtcdDiscovery

        return EtcdDiscovery(config.etcd_endpoints, ttl=config.lease_ttl)
    raise AssertionError(backend)
