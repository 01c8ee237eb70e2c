"""dynamo-serve."""

from dynamo_serve._version import __version__

__all__ = ["__version__"]
