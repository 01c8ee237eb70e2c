"""`BaseDeployment`: how a component is deployed, declared next to its code.

Every component module defines `class Deployment(BaseDeployment)` and overrides what it needs
(class attributes, not instances: `dynamo serve` and `dynamo deploy` read them without creating
anything)::

    class Deployment(BaseDeployment):
        resources = Resources(gpu=1, cpu="8", memory="32Gi")
        health_http_port_arg = "http-port"

and a module-level `build_parser()` returning its `DynFlexibleArgumentParser`. `load_deployment`
and `load_parser` find both by module name, which is all a graph file names. Importing a
component module must stay cheap and must not import an engine (engines are imported inside
`main()`), so that the launcher can read a hundred components in a blink.

`name` defaults to the module's last dotted part (`dynamo_core.mocker` -> "mocker"; a trailing
`__main__` is skipped; `_` becomes `-`, as Kubernetes names want). A name set explicitly is
inherited by subclasses; a derived one is derived again for each subclass from its own module.
The attributes are checked when the subclass is created, so a typo such as `replicas = "2"`
fails at import, naming the class, rather than in a manifest later.

There is no `namespace` attribute: a component's namespace is a launch setting (`--namespace`,
the graph's `namespace:`, `DYN_NAMESPACE`), one source of truth. A subclass that still sets
one gets a `DeprecationWarning` naming it (the value was never read).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynamo_core.errors import ConfigError

if TYPE_CHECKING:
    from dynamo_core.args import DynFlexibleArgumentParser

__all__ = ["BaseDeployment", "Resources", "load_deployment", "load_parser"]


class Resources(BaseModel):
    """What one replica needs: GPUs (whole devices), and Kubernetes-style CPU and memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: int = Field(default=0, ge=0, description="Whole GPUs per replica (CUDA_VISIBLE_DEVICES).")
    cpu: str = Field(default="1", min_length=1, description="CPU request, e.g. '1', '500m'.")
    memory: str = Field(default="2Gi", min_length=1, description="Memory request, e.g. '2Gi'.")


def _name_from_module(module: str) -> str:
    parts = [p for p in module.split(".") if p not in ("__main__", "__init__")]
    return (parts[-1] if parts else module).replace("_", "-")


class BaseDeployment:
    """Defaults for every component; a component's `Deployment` overrides what it needs."""

    name: ClassVar[str] = "base"
    resources: ClassVar[Resources] = Resources()
    replicas: ClassVar[int] = 1
    env: ClassVar[dict[str, str]] = {}
    image: ClassVar[str | None] = None
    #: Name of the flag that holds an HTTP port answering `GET /health` (probes), if any.
    health_http_port_arg: ClassVar[str | None] = None

    _name_is_derived: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "namespace" in cls.__dict__:
            warnings.warn(
                f"{cls.__module__}.{cls.__qualname__}.namespace is ignored: the namespace comes "
                "from --namespace, the graph file or DYN_NAMESPACE (remove the attribute)",
                DeprecationWarning,
                stacklevel=2,
            )
        if "name" in cls.__dict__:
            cls._name_is_derived = False
        elif cls._name_is_derived:
            cls.name = _name_from_module(cls.__module__)
        cls._check()

    @classmethod
    def _check(cls) -> None:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if isinstance(cls.resources, dict):
            try:
                cls.resources = Resources.model_validate(cls.resources)
            except ValidationError as exc:
                raise ConfigError(f"{where}.resources: {exc.errors()[0]['msg']}") from None
        problems = []
        if not isinstance(cls.name, str) or not cls.name:
            problems.append("name must be a non-empty string")
        if not isinstance(cls.resources, Resources):
            problems.append("resources must be a Resources(gpu=..., cpu=..., memory=...)")
        if isinstance(cls.replicas, bool) or not isinstance(cls.replicas, int) or cls.replicas < 0:
            problems.append("replicas must be an integer >= 0")
        if not isinstance(cls.env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in cls.env.items()
        ):
            problems.append("env must map strings to strings")
        if cls.image is not None and not isinstance(cls.image, str):
            problems.append("image must be a string or None")
        if cls.health_http_port_arg is not None and not isinstance(cls.health_http_port_arg, str):
            problems.append("health_http_port_arg must be a flag name or None")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Every attribute, resolved (plain data, safe to serialize or to modify)."""
        return {
            "module": cls.__module__,
            "name": cls.name,
            "resources": cls.resources.model_dump(),
            "replicas": cls.replicas,
            "env": dict(cls.env),
            "image": cls.image,
            "health_http_port_arg": cls.health_http_port_arg,
        }

    @classmethod
    def resources_for(cls, args: Mapping[str, Any]) -> Resources:
        """The resources of one replica run with `args` (a graph's args, flag names as keys).

        Launchers (`dynamo serve`, `dynamo deploy`) ask this rather than read `resources`, so a
        component whose GPU count depends on its flags (tensor parallelism) can say so.
        """
        return cls.resources

    @classmethod
    def launch_prefix(cls, args: Mapping[str, Any]) -> list[str]:
        """What goes before `python -m <module> <flags>` for one replica (e.g. an MPI launcher
        for a multi-GPU engine); empty for a plain process."""
        return []


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import component module '{module_name}': {exc}") from exc


def load_deployment(module_name: str) -> type[BaseDeployment]:
    """The `Deployment` class of a component module."""
    module = _import(module_name)
    deployment = getattr(module, "Deployment", None)
    if deployment is None:
        raise ConfigError(
            f"component module '{module_name}' defines no Deployment "
            "(add: class Deployment(dynamo_core.deploy.BaseDeployment))"
        )
    if not (isinstance(deployment, type) and issubclass(deployment, BaseDeployment)):
        raise ConfigError(
            f"{module_name}.Deployment is not a subclass of dynamo_core.deploy.BaseDeployment"
        )
    return deployment


def load_parser(module_name: str, *, engine: bool = True) -> DynFlexibleArgumentParser[Any]:
    """The parser a component module's `build_parser()` returns (its engine is not imported).

    `engine=False`: in Dynamo-only mode (`without_engine()`), as launchers plan with it: the
    engine's parser is never built, so even validating and rendering flags imports no engine."""
    from dynamo_core.args import DynFlexibleArgumentParser

    module = _import(module_name)
    build = getattr(module, "build_parser", None)
    if not callable(build):
        raise ConfigError(
            f"component module '{module_name}' defines no build_parser() "
            "(a function returning its DynFlexibleArgumentParser)"
        )
    parser = build()
    if not isinstance(parser, DynFlexibleArgumentParser):
        raise ConfigError(
            f"{module_name}.build_parser() returned {type(parser).__name__}, "
            "not a DynFlexibleArgumentParser"
        )
    return parser if engine else parser.without_engine()
