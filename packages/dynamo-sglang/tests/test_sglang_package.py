import subprocess
import sys
from importlib.metadata import entry_points

import dynamo_core
import dynamo_sglang
from dynamo_core.deploy import load_deployment
from dynamo_core.engines import find_engine


def test_public_names() -> None:
    assert dynamo_sglang.__all__ == ["ENGINE", "__version__"]


def test_one_version_for_all_packages() -> None:
    assert dynamo_sglang.__version__ == dynamo_core.__version__


def test_engine_spec() -> None:
    spec = dynamo_sglang.ENGINE
    assert (spec.name, spec.module, spec.extra) == (
        "sglang",
        "dynamo_sglang.worker",
        "dynamo-sglang[sglang]",
    )


def test_entry_point_when_installed() -> None:
    names = {ep.name for ep in entry_points(group="dynamo.engines")}
    if "sglang" in names:  # installed as a wheel (the nox session), not only on PYTHONPATH
        assert find_engine("sglang") == dynamo_sglang.ENGINE
        module = find_engine("sglang").load()
        assert callable(module.build_parser) and callable(module.worker.run_in)


def test_role_modules_import_without_sglang() -> None:
    code = (
        "import sys; import dynamo_sglang, dynamo_sglang.worker, dynamo_sglang.prefill, "
        "dynamo_sglang.decode, dynamo_sglang.handlers, dynamo_sglang.kv_events; "
        "assert not any(m == 'sglang' or m.startswith('sglang.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deployments() -> None:
    for role in ("worker", "prefill", "decode"):
        dep = load_deployment(f"dynamo_sglang.{role}")
        assert dep.name == f"sglang-{role}"
        assert dep.resources.gpu == 1
