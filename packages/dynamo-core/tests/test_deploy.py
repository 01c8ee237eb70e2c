"""`BaseDeployment` and finding a component's Deployment and parser by module name."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.deploy import BaseDeployment, Resources, load_deployment, load_parser
from dynamo_core.errors import ConfigError

# A component module shaped like the real ones: a Deployment, a build_parser() whose engine
# parser imports the (fake) engine only when it is built, and a main().
COMPONENT = '''
"""A test component."""
from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser, parse_component_args
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.runtime.config import RuntimeConfig


class Config(RuntimeConfig):
    model_path: str | None = Field(default=None, description="Model.")


def _engine_args(parser):
    import dyn_test_fake_engine
    dyn_test_fake_engine.add_cli_args(parser)


def build_parser():
    return DynFlexibleArgumentParser(
        Config, prog="dyn_test_component", engine_args=_engine_args, engine_name="fake"
    )


class Deployment(BaseDeployment):
    resources = Resources(gpu=1, cpu="4", memory="16Gi")
    replicas = 2
    env = {"FOO": "bar"}
'''

FAKE_ENGINE = """
def add_cli_args(parser):
    parser.add_argument("--tp-size", type=int, default=1, help="Tensor parallelism.")
"""

MODULES = ("dyn_test_component", "dyn_test_fake_engine", "dyn_test_empty", "dyn_test_wrong")


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "dyn_test_component.py").write_text(textwrap.dedent(COMPONENT))
    (tmp_path / "dyn_test_fake_engine.py").write_text(textwrap.dedent(FAKE_ENGINE))
    (tmp_path / "dyn_test_empty.py").write_text('"""No Deployment, no build_parser."""\n')
    (tmp_path / "dyn_test_wrong.py").write_text("Deployment = 1\nbuild_parser = dict\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in MODULES:
        sys.modules.pop(name, None)


def test_defaults() -> None:
    assert not hasattr(BaseDeployment, "namespace")  # a launch setting, not a class attribute
    assert BaseDeployment.resources == Resources(gpu=0, cpu="1", memory="2Gi")
    assert BaseDeployment.replicas == 1
    assert BaseDeployment.env == {}
    assert BaseDeployment.image is None
    assert BaseDeployment.health_http_port_arg is None


def test_subclass_overrides_and_describe() -> None:
    class Deployment(BaseDeployment):
        resources = Resources(gpu=2)
        replicas = 3
        env = {"HF_HOME": "/cache"}
        image = "nvcr.io/dynamo:1"
        health_http_port_arg = "http-port"

    assert Deployment.describe() == {
        "module": __name__,
        "name": "test-deploy",
        "resources": {"gpu": 2, "cpu": "1", "memory": "2Gi"},
        "replicas": 3,
        "env": {"HF_HOME": "/cache"},
        "image": "nvcr.io/dynamo:1",
        "health_http_port_arg": "http-port",
    }
    # describe() hands out copies
    Deployment.describe()["env"]["X"] = "1"
    assert Deployment.env == {"HF_HOME": "/cache"}
    # the base is untouched
    assert BaseDeployment.resources.gpu == 0


def test_a_namespace_attribute_is_deprecated_and_ignored() -> None:
    with pytest.warns(DeprecationWarning, match=r"Old\.namespace is ignored.*DYN_NAMESPACE"):

        class Old(BaseDeployment):
            namespace = "prod"

    assert "namespace" not in Old.describe()


def test_name_is_derived_from_the_module_unless_set() -> None:
    Derived = type("Derived", (BaseDeployment,), {"__module__": "dynamo_core.mocker"})
    assert Derived.name == "mocker"
    Main = type("Main", (BaseDeployment,), {"__module__": "dynamo_sglang.decode.__main__"})
    assert Main.name == "decode"

    class Named(BaseDeployment):
        name = "backend"

    Child = type("Child", (Named,), {"__module__": "somewhere.else"})
    assert Child.name == "backend"  # an explicit name is inherited


def test_resources_are_frozen_and_checked() -> None:
    with pytest.raises(ValueError):
        Resources(gpu=-1)
    res = Resources()
    with pytest.raises(ValueError):
        res.gpu = 1  # type: ignore[misc]


def test_bad_attributes_fail_when_the_class_is_made() -> None:
    with pytest.raises(ConfigError, match="replicas must be an integer"):
        type("Bad", (BaseDeployment,), {"replicas": "2"})
    with pytest.raises(ConfigError, match="env must map strings to strings"):
        type("Bad", (BaseDeployment,), {"env": {"A": 1}})
    with pytest.raises(ConfigError, match="resources"):
        type("Bad", (BaseDeployment,), {"resources": "1 gpu"})


def test_load_deployment(modules: Path) -> None:
    deployment = load_deployment("dyn_test_component")
    assert issubclass(deployment, BaseDeployment)
    assert deployment.name == "dyn-test-component"
    assert deployment.resources.gpu == 1
    assert deployment.replicas == 2
    assert deployment.describe()["env"] == {"FOO": "bar"}


def test_load_parser_does_not_import_the_engine(modules: Path) -> None:
    parser = load_parser("dyn_test_component")
    assert isinstance(parser, DynFlexibleArgumentParser)
    assert "dyn_test_fake_engine" not in sys.modules
    # asking the component's own parser validates graph args, engine flags included
    assert parser.check(["--model-path", "m", "--tp-size", "2"], environ={}) == []
    assert parser.check(["--tp-sise", "2"], environ={}) == [
        "unknown flag '--tp-sise' on command line (did you mean '--tp-size'?)"
    ]
    assert "dyn_test_fake_engine" in sys.modules


def test_load_errors_are_config_errors(modules: Path) -> None:
    with pytest.raises(ConfigError, match="cannot import component module 'dyn_test_nope'"):
        load_deployment("dyn_test_nope")
    with pytest.raises(ConfigError, match="defines no Deployment"):
        load_deployment("dyn_test_empty")
    with pytest.raises(ConfigError, match="defines no build_parser"):
        load_parser("dyn_test_empty")
    with pytest.raises(ConfigError, match="not a subclass"):
        load_deployment("dyn_test_wrong")
    with pytest.raises(ConfigError, match="not a DynFlexibleArgumentParser"):
        load_parser("dyn_test_wrong")


def test_load_parser_without_the_engine_checks_dynamos_flags_only(modules: Path) -> None:
    """What launchers plan with: the engine's parser is never built, its flags pass through
    (the child checks them at start), and a close misspelling of a Dynamo flag is still caught."""
    parser = load_parser("dyn_test_component", engine=False)
    assert parser.check(["--model-path", "m", "--tp-sise", "2"], environ={}) == []
    outcome = parser.resolve(["--model-path", "m", "--tp-sise=2"], environ={})
    assert outcome.parsed is not None and outcome.parsed.passthrough == ["--tp-sise=2"]
    assert parser.check(["--modle-path", "m"], environ={}) == [
        "unknown flag '--modle-path' on command line (did you mean '--model-path'?)"
    ]
    assert "--tp-size" not in parser.option_actions()
    assert "dyn_test_fake_engine" not in sys.modules
