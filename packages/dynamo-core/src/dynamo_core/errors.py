"""Errors as types, carried across processes with their message.

Every error the runtime raises is a `DynamoError`. When a handler raises, the request plane sends
the exception's type name and message to the caller, which raises:

- the same class, if the name is one of the `DynamoError` subclasses registered here (so a worker
  raising `InvalidRequestError("prompt too long")` reaches the frontend as `InvalidRequestError`);
- otherwise `HandlerError`, whose `type_name` keeps the original name (`ValueError`, `RuntimeError`)
  and whose message reads `ValueError: <message>`.

Only names and strings cross the wire, never pickled objects.

`EXIT_CONFIG` (78, BSD's `EX_CONFIG`) is the exit status of a component that stopped on a
`ConfigError`: an error that will recur identically on a restart (a bad flag value, a model that
is not there, a port already taken). `dynamo serve` stops the graph on it instead of restarting.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Final

__all__ = [
    "EXIT_CONFIG",
    "AuthenticationError",
    "BackendUnavailableError",
    "CancelledError",
    "ConfigError",
    "ConnectionLostError",
    "DrainingError",
    "DynamoError",
    "EndpointNotFoundError",
    "EngineError",
    "EngineNotInstalledError",
    "EngineVersionError",
    "HandlerError",
    "InstanceNotFoundError",
    "InvalidRequestError",
    "NoInstancesError",
    "NotResumableError",
    "OverloadedError",
    "PortInUseError",
    "ProtocolError",
    "error_from_wire",
    "error_to_wire",
    "listen_errors",
]

#: Exit status of a process that stopped on a `ConfigError` (sysexits.h `EX_CONFIG`).
EXIT_CONFIG: Final = 78


class DynamoError(Exception):
    """Base of every error raised by Dynamo."""

    #: Suggested HTTP status when this error reaches an HTTP client.
    http_status: ClassVar[int] = 500
    _registry: ClassVar[dict[str, type[DynamoError]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        DynamoError._registry[cls.__name__] = cls

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(DynamoError):
    """A flag, environment variable or config file is invalid."""

    http_status = 400


class EngineNotInstalledError(ConfigError):
    """The engine library a worker runs on is not installed (the message says what to install)."""


class EngineVersionError(ConfigError):
    """The engine library is installed at a version its engine package does not support."""


class PortInUseError(ConfigError):
    """A port this process must listen on is taken (or not ours to take)."""


_LISTEN_REASONS = {
    errno.EADDRINUSE: "the port is already in use",
    errno.EACCES: "permission denied",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
}


@contextmanager
def listen_errors(host: str, port: int, flag: str) -> Iterator[None]:
    """Around a bind: an `OSError` a user can fix becomes one line naming the port and `flag`."""
    try:
        yield
    except OSError as exc:
        reason = _LISTEN_REASONS.get(exc.errno or 0)
        if reason is None:
            raise
        raise PortInUseError(
            f"cannot listen on {host}:{port}: {reason}; choose another with {flag}"
        ) from None


class BackendUnavailableError(DynamoError):
    """A discovery, request-plane or event-plane service cannot be reached."""

    http_status = 503


class NoInstancesError(DynamoError):
    """No live instance serves the endpoint."""

    http_status = 503


class OverloadedError(DynamoError):
    """Every worker of the model is busy and the queue is full (admission control)."""

    http_status = 503
    #: Seconds a client should wait before retrying (the HTTP `Retry-After` header).
    retry_after: ClassVar[int] = 1


class InstanceNotFoundError(DynamoError):
    """The instance named in a direct request is not (or no longer) live."""

    http_status = 503


class EndpointNotFoundError(DynamoError):
    """The process reached does not serve the requested endpoint."""

    http_status = 503


class ConnectionLostError(DynamoError):
    """The connection to the serving process broke before the stream ended."""

    http_status = 503


class DrainingError(DynamoError):
    """The instance is shutting down: it refused a new request before doing any work on it.

    Nothing was generated, so the caller sends the request to another instance at once (the
    frontend does, without counting it as a migration)."""

    http_status = 503


class NotResumableError(DynamoError):
    """A stream broke after part of its answer reached the client, and the answer cannot be
    continued on another instance (a structured-output constraint would start again from its
    beginning there). Nothing is wrong with the request: sending it again succeeds."""

    http_status = 503


class ProtocolError(DynamoError):
    """A peer sent bytes that are not a valid frame."""


class AuthenticationError(DynamoError):
    """The peer did not prove it holds the shared secret (`DYN_AUTH_TOKEN`).

    Between a frontend and its workers this is the operator's problem (the secret differs), not
    the HTTP client's: it is answered 503, never 401 (which OpenAI clients read as a bad API key).
    """

    http_status = 503


class CancelledError(DynamoError):
    """The request was cancelled by its caller."""

    http_status = 499


class InvalidRequestError(DynamoError):
    """The request is malformed or asks for something the engine cannot do."""

    http_status = 400


class EngineError(DynamoError):
    """The engine failed while serving the request."""


class HandlerError(DynamoError):
    """A handler raised an exception that is not a `DynamoError`.

    `type_name` is the original exception's class name; the message is `<type_name>: <text>`.
    """

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(f"{type_name}: {text}" if text else type_name)
        self.type_name = type_name
        self.text = text


def error_to_wire(exc: BaseException) -> tuple[str, str]:
    """The (type name, message) pair that represents `exc` on the wire."""
    if isinstance(exc, HandlerError):
        return exc.type_name, exc.text
    if isinstance(exc, DynamoError):
        return type(exc).__name__, exc.message
    return type(exc).__name__, str(exc)


def error_from_wire(type_name: str, message: str) -> DynamoError:
    """Rebuild the error a peer reported."""
    cls = DynamoError._registry.get(type_name)
    if cls is None or cls is HandlerError:
        return HandlerError(type_name, message)
    return cls(message)
