"""dynamo_core._memory: freed memory goes back to the OS after a burst of large requests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynamo_core._memory import Trimmer


def test_trims_once_when_a_burst_ends() -> None:
    trimmer = Trimmer(min_interval=0)
    trimmer.started()
    trimmer.started()
    trimmer.ended()
    assert trimmer.trims == 0  # one job still running
    trimmer.ended()
    assert trimmer.trims == 1
    slow = Trimmer(min_interval=3600)
    for _ in range(3):
        slow.started()
        slow.ended()
    assert slow.trims == 1  # at most once per interval


def test_the_first_burst_trims_on_a_machine_booted_a_moment_ago(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dynamo_core._memory as memory

    monkeypatch.setattr(memory.time, "monotonic", lambda: 5.0)  # seconds since boot, on CI
    trimmer = Trimmer(min_interval=3600)
    trimmer.started()
    trimmer.ended()
    assert trimmer.trims == 1


_BURST = """
import sys
from dynamo_core._memory import return_large_blocks
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
if sys.argv[1] == "fixed":
    return_large_blocks()
del bytearray(4 * 1024 * 1024)[:]  # one large block freed: glibc raises its threshold to 4 MB
before = rss()
blocks = [bytearray(3 * 1024 * 1024) for _ in range(20)]  # 60 MB, touched, then freed
del blocks[::2]
held = [bytearray(1000) for _ in range(1000)]  # small blocks allocated after them
del blocks
print((rss() - before) // 2**20)
"""


def test_large_blocks_are_returned_when_freed() -> None:
    # in a fresh interpreter: what the test process allocated before would blur the figure
    def kept_mb(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _BURST, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    assert kept_mb("fixed") < 10
