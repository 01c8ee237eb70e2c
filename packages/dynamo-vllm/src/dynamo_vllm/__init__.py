"""dynamo-vllm."""

from dynamo_vllm._version import __version__

__all__ = ["__version__"]
