"""dynamo-trtllm."""

from dynamo_trtllm._version import __version__

__all__ = ["__version__"]
