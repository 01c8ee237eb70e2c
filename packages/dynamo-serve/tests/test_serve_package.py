import dynamo_core
import dynamo_serve


def test_public_names() -> None:
    assert dynamo_serve.__all__ == ["__version__"]


def test_one_version_for_all_packages() -> None:
    assert dynamo_serve.__version__ == dynamo_core.__version__
