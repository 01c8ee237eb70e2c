import dynamo_core
import dynamo_vllm


def test_public_names() -> None:
    assert dynamo_vllm.__all__ == ["__version__"]


def test_one_version_for_all_packages() -> None:
    assert dynamo_vllm.__version__ == dynamo_core.__version__
