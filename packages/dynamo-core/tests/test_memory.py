"""dynamo_core._memory: freed memory goes back to the OS after a burst of large requests."""

from __future__ import annotations

from dynamo_core._memory import Trimmer, return_large_blocks


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


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


def test_large_blocks_are_returned_when_freed() -> None:
    return_large_blocks()
    before = rss_bytes()
    blocks = [bytearray(3 * 1024 * 1024) for _ in range(20)]  # 60 MB, touched
    assert rss_bytes() - before > 50 * 1024 * 1024
    del blocks
    assert rss_bytes() - before < 10 * 1024 * 1024
