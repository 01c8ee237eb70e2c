"""`run_component`: the one `main()` of every component.

    def main(argv: list[str] | None = None) -> None:
        run_component(build_parser(), worker, argv, engine=ENGINE)

In order:

1. **parse** (`parse_or_exit`): each problem one line on stderr, exit status 2; `--help` and
   `--print-config` print and exit 0. Parsing comes first so that `--help` works without the
   engine installed. Started with `--config graph.yaml --component X`, the component's
   environment is what `dynamo serve` would give it (the module's `Deployment.env`, the graph's
   and the component's `env`, the graph's namespace): it is set in `os.environ` here, before
   logging is configured and the runtime starts, and the engine's own processes inherit it.
2. **check the engine** (`EngineSpec.check`): not installed, or at a version outside the range
   its engine package declares, is one line and exit status 1 (as a failed start).
3. **configure logging** from `DYN_LOG` / `DYN_LOGGING_JSONL` (`configure_logging`).
4. **`before_run(args, argv)`**, the hook for what must happen in the process before the
   runtime starts: TensorRT-LLM re-executes itself under `mpirun` there. A `ConfigError` it
   raises is one line and exit status 1.
5. **run** `worker.run(args)` and exit with its status (0; 78 for a `ConfigError`, 1 for any
   other `DynamoError`, 130 after an interrupt: see `dynamo_core.runtime.worker`).

The worker is a `@dynamo_worker()` function taking `(runtime, args)`: the runtime is built from
`args.config` (a `RuntimeConfig` subclass), as `python -m`, `dynamo serve` and `dynamo-run`
alike expect.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from dynamo_core.errors import ConfigError, EngineNotInstalledError, EngineVersionError
from dynamo_core.runtime.logs import configure_logging

if TYPE_CHECKING:
    from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
    from dynamo_core.engines import EngineSpec
    from dynamo_core.runtime.worker import DynamoWorker

__all__ = ["BeforeRun", "run_component"]

#: Called with the parsed args and the command line, after logging is set up and before the
#: runtime starts (TensorRT-LLM's MPI relaunch).
BeforeRun = Callable[["ParsedArgs[Any]", list[str]], None]


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)


def run_component(
    parser: DynFlexibleArgumentParser[Any],
    worker: DynamoWorker[[Any]],
    argv: list[str] | None = None,
    *,
    engine: EngineSpec | None = None,
    before_run: BeforeRun | None = None,
) -> NoReturn:
    """Parse, check the engine, configure logging, run (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    deployment = getattr(sys.modules.get(worker.__module__), "Deployment", None)
    args = parser.parse_or_exit(argv, module_env=getattr(deployment, "env", None))
    os.environ.update(args.env_overlay)  # a graph file's env, as dynamo serve would set it
    if engine is not None:
        try:
            engine.check()
        except (EngineNotInstalledError, EngineVersionError) as exc:
            _fail(str(exc))
    configure_logging()
    if before_run is not None:
        try:
            before_run(args, argv)
        except ConfigError as exc:
            _fail(str(exc))
    sys.exit(worker.run(args))
