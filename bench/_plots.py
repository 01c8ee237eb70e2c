"""What the benchmarks' pictures share: matplotlib (an optional extra), loaded headless, and
how a figure is titled and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('no plot: matplotlib is not installed (pip install "dynamo-core[bench]")')
        return None
    return plt


def save(fig: Any, path: Path, title: str, fontsize: int = 9) -> None:
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
