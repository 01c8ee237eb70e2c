"""The OpenAI-compatible frontend (`python -m dynamo_core.frontend`)."""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    from dynamo_core.frontend.main import main as _main

    _main(argv)
