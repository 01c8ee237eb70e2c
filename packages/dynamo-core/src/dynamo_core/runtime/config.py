"""`RuntimeConfig`: the settings every component shares (namespace and backends).

Component configs subclass it, so `--namespace`, `--discovery-backend`, `--request-plane` and
`--event-plane` (and their environment variables) are declared once, here. Each field's
environment variable is `DYN_<FIELD>` unless `json_schema_extra={"env": ...}` names another
(Dynamo's own names: `ETCD_ENDPOINTS`, `NATS_SERVER`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["RuntimeConfig", "default_file_kv_dir", "env_var_name"]

DiscoveryBackend = Literal["file", "etcd", "mem"]
RequestPlane = Literal["tcp", "nats", "inproc"]
EventPlane = Literal["tcp", "nats"]


def default_file_kv_dir() -> Path:
    """A per-user folder under the temp dir, shared by every process of that user."""
    user = os.environ.get("USER") or str(os.getuid())
    return Path(tempfile.gettempdir()) / f"dynamo-{user}" / "kv"


def env_var_name(field_name: str, extra: Any = None) -> str:
    """The environment variable that sets `field_name`."""
    if isinstance(extra, dict) and isinstance(extra.get("env"), str):
        return str(extra["env"])
    return "DYN_" + field_name.upper()


class RuntimeConfig(BaseModel):
    """How this process finds its peers and talks to them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    namespace: str = Field(
        "dynamo",
        description="Namespace of this component: graphs in different namespaces never meet.",
    )
    discovery_backend: DiscoveryBackend = Field(
        "file",
        description="Where instances and models are registered: file (one machine, no service), "
        "etcd (ETCD_ENDPOINTS), mem (one process).",
    )
    request_plane: RequestPlane = Field(
        "tcp",
        description="How requests reach workers: tcp (direct connections), nats (NATS_SERVER), "
        "inproc (one process).",
    )
    event_plane: EventPlane = Field(
        "tcp", description="How KV events and load metrics travel: tcp or nats."
    )
    file_kv: Path | None = Field(
        None,
        description="Folder of the file discovery backend (default: a per-user folder in the temp dir).",
    )
    tcp_host: str | None = Field(
        None,
        description="Address the TCP request plane listens on and advertises "
        "(default 127.0.0.1 with file discovery, this host's address otherwise).",
    )
    tcp_port: int = Field(
        0, ge=0, le=65535, description="TCP request-plane port (0: any free port)."
    )
    etcd_endpoints: str = Field(
        "http://127.0.0.1:2379",
        description="Comma-separated etcd endpoints for --discovery-backend etcd.",
        json_schema_extra={"env": "ETCD_ENDPOINTS"},
    )
    nats_server: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS server URL for the nats request and event planes.",
        json_schema_extra={"env": "NATS_SERVER"},
    )
    auth_token: SecretStr | None = Field(
        None, description="Shared secret a peer must prove before the request plane serves it."
    )
    system_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of this process's status server (/health, /live, /metrics); "
        "unset: none, 0: any free port.",
    )
    system_host: str = Field("0.0.0.0", description="Address the status server listens on.")
    lease_ttl: float = Field(
        10.0,
        gt=0,
        description="Seconds within which a process's registrations disappear once it stops "
        "renewing them (killed, hung or cut off); with etcd, 2.5 is the smallest it can keep.",
    )
    heartbeat_timeout: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Seconds a request-plane peer may stay silent (heartbeats are sent every "
        "fifth of it) before it is declared hung or unreachable: its streams move to another "
        "instance and it gets no new request until it answers again.",
    )
    graceful_shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds in-flight requests get to finish after SIGTERM before they are cancelled.",
    )

    def resolved_file_kv(self) -> Path:
        return self.file_kv if self.file_kv is not None else default_file_kv_dir()

    @classmethod
    def in_process(cls, **overrides: Any) -> RuntimeConfig:
        """Settings for a graph living in one process (`mem` discovery, `inproc` requests)."""
        return cls(discovery_backend="mem", request_plane="inproc", **overrides)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RuntimeConfig:
        """Defaults overridden by the environment only (the arg parser adds files and flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            var = env_var_name(name, field.json_schema_extra)
            if var in env:
                values[name] = env[var]
        return cls.model_validate(values)

    def runtime_settings(self) -> RuntimeConfig:
        """Only the runtime part of a (possibly larger) component config."""
        data = {name: getattr(self, name) for name in RuntimeConfig.model_fields}
        return RuntimeConfig.model_validate(data)
