"""dynamo-sglang."""

from dynamo_sglang._version import __version__

__all__ = ["__version__"]
