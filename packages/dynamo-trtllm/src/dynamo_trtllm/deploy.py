"""`TrtllmDeployment`: what the three roles share about how they are deployed.

A worker takes tensor x pipeline parallel size GPUs and, above one, an MPI world. `dynamo serve`
reads only the static `resources` (a graph sets `resources: {gpu: N}`) and runs
`python -m <module> <flags>`; the worker then re-runs itself under MPI (`dynamo_trtllm.mpi`).
`resources_for(args)` and `launch_prefix(args)` say the same from a component's args, for a
launcher that asks (the hook `dynamo serve` could call to size GPUs and print the MPI command).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_trtllm.mpi import launch_prefix

__all__ = ["TrtllmDeployment"]


def _arg(args: Mapping[str, Any], name: str, default: Any) -> Any:
    for key in (name, name.replace("-", "_"), "--" + name):
        if key in args:
            return args[key]
    return default


class TrtllmDeployment(BaseDeployment):
    name = "trtllm"
    resources = Resources(gpu=1, cpu="8", memory="32Gi")

    @classmethod
    def world_size(cls, args: Mapping[str, Any]) -> int:
        """GPUs (MPI ranks) of one replica with these args."""
        tp = int(_arg(args, "tensor-parallel-size", 1))
        pp = int(_arg(args, "pipeline-parallel-size", 1))
        return tp * pp

    @classmethod
    def resources_for(cls, args: Mapping[str, Any]) -> Resources:
        """`resources` with one GPU per rank."""
        return cls.resources.model_copy(update={"gpu": cls.world_size(args)})

    @classmethod
    def launch_prefix(cls, args: Mapping[str, Any]) -> list[str]:
        """What goes before `python -m <module> <flags>` for a multi-GPU replica (else [])."""
        world = cls.world_size(args)
        if world <= 1 or _arg(args, "mpi-launcher", "mpirun") != "mpirun":
            return []
        return launch_prefix(world)
