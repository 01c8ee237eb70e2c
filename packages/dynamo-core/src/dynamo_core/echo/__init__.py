"""The echo engine (`python -m dynamo_core.echo`, `dynamo-run out=echo`): see `main.py`.

A package rather than a module so that `python3 path/to/dynamo_core/echo/main.py` works as a
script: a script's own folder comes first on `sys.path`, and `dynamo_core/` holds `http.py`,
which would shadow the standard library's `http`.
"""

from __future__ import annotations

from dynamo_core.echo.main import (
    Deployment,
    EchoAdapter,
    EchoConfig,
    EchoHandler,
    build_parser,
    main,
    worker,
)

__all__ = [
    "Deployment",
    "EchoAdapter",
    "EchoConfig",
    "EchoHandler",
    "build_parser",
    "main",
    "worker",
]
