"""Dynamo core: the runtime, the component model, the LLM path, frontend, router and mocker.

Submodules are imported on demand (`dynamo_core.runtime`, `dynamo_core.args`, ...), so importing
`dynamo_core` is cheap.
"""

from dynamo_core._version import __version__

__all__ = ["__version__"]
