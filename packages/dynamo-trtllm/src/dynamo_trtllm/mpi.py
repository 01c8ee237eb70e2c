"""Giving a multi-GPU worker the MPI world TensorRT-LLM expects.

A TensorRT-LLM engine with tensor*pipeline parallel size N > 1 runs as N MPI ranks. The LLM API
documents two ways to get them:

- **launched in a world**: `mpirun -n N ... trtllm-llmapi-launch python -m dynamo_trtllm.worker ...`
  or, under SLURM, `srun --mpi=pmix --ntasks N ... trtllm-llmapi-launch python -m ...` (the only
  way across nodes). `trtllm-llmapi-launch` runs our module on rank 0 (with the MPI variables
  cleared, `tllm_mpi_size` and `TLLM_SPAWN_PROXY_PROCESS` set) and TensorRT-LLM's MPI workers on
  the other ranks; the LLM then uses that pre-spawned world;
- **spawned**: on one node, `LLM(...)` alone spawns N MPI workers (mpi4py's pool), which is what
  does not mix with process managers such as SLURM's.

`dynamo serve` runs every component as `python -m <module> <flags>` (what `--dry-run` prints),
so `maybe_relaunch` makes that command work: a worker that needs N > 1 ranks and is not in a
world re-executes itself as the first form (`--mpi-launcher mpirun`, the default; one node). A
process already in a world (any of `WORLD_MARKERS` set) is left alone, as is `--mpi-launcher
spawn`. `RELAUNCHED` guards against a loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dynamo_core.errors import ConfigError

if TYPE_CHECKING:
    from dynamo_core.args import ParsedArgs

__all__ = [
    "RELAUNCHED",
    "WORLD_MARKERS",
    "in_mpi_world",
    "launch_prefix",
    "maybe_relaunch",
    "mpi_command",
    "relaunch_under_mpi",
]

log = logging.getLogger("dynamo.trtllm.mpi")

#: Set in the re-executed process (not a DYN_ variable: the parsers check those).
RELAUNCHED = "DYNAMO_TRTLLM_RELAUNCHED"

#: Variables that say "this process is a rank of an MPI world" (trtllm-llmapi-launch's own first:
#: it clears the others before running our module on rank 0).
WORLD_MARKERS = (
    "tllm_mpi_size",
    "TLLM_SPAWN_PROXY_PROCESS",
    "OMPI_COMM_WORLD_SIZE",
    "PMIX_RANK",
    "PMI_SIZE",
    "PMI_RANK",
    RELAUNCHED,
)


def in_mpi_world(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in WORLD_MARKERS)


def launch_prefix(world_size: int) -> list[str]:
    """What goes before a command to run it as rank 0 of a `world_size` MPI world (one node)."""
    return [
        "mpirun",
        "-n",
        str(world_size),
        "--oversubscribe",
        "--allow-run-as-root",
        "trtllm-llmapi-launch",
    ]


def mpi_command(
    world_size: int, module: str, argv: Sequence[str], *, python: str = sys.executable
) -> list[str]:
    """The command that runs `python -m module argv` as rank 0 of a `world_size` MPI world."""
    return [*launch_prefix(world_size), python, "-m", module, *argv]


def maybe_relaunch(
    world_size: int,
    launcher: str,
    module: str,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Re-execute this worker under mpirun when it needs a world and is not in one.

    Returns only when nothing needs doing; otherwise replaces the process (`os.execvpe`).
    """
    env = dict(os.environ if environ is None else environ)
    if world_size <= 1 or launcher != "mpirun" or in_mpi_world(env):
        return
    missing = [tool for tool in ("mpirun", "trtllm-llmapi-launch") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"tensor x pipeline parallel size {world_size} needs an MPI world, and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH: "
            "install Open MPI (TensorRT-LLM's containers have it), start this command under "
            "mpirun/srun with trtllm-llmapi-launch, or use --mpi-launcher spawn"
        )
    command = mpi_command(world_size, module, argv)
    env[RELAUNCHED] = "1"
    log.info("re-running under MPI (%d ranks): %s", world_size, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)


def relaunch_under_mpi(module: str) -> Callable[[ParsedArgs[Any], list[str]], None]:
    """A role's `before_run` hook (`dynamo_core.component.run_component`): `maybe_relaunch` with
    the parsed world size and launcher. The module is named, not taken from `__spec__`, so a
    role started as a script (`python3 path/to/worker.py`) re-runs as `python -m module`."""

    def before_run(args: ParsedArgs[Any], argv: list[str]) -> None:
        maybe_relaunch(args.config.world_size, args.config.mpi_launcher, module, argv)

    return before_run
