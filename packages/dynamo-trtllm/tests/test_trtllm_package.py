import dynamo_core
import dynamo_trtllm


def test_public_names() -> None:
    assert dynamo_trtllm.__all__ == ["ENGINE", "__version__"]


def test_one_version_for_all_packages() -> None:
    assert dynamo_trtllm.__version__ == dynamo_core.__version__
