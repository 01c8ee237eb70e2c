"""Giving freed memory back to the OS, so a burst of large requests does not leave the frontend big.

Two glibc behaviours keep freed memory in a process:

- after the first free of a block of 128 KiB or more, glibc raises the size from which blocks
  get their own mapping (unmapped on free) to the freed size, up to 32 MiB: from then on, request
  bodies and prompts of a few MB come from the heap and stay there. `return_large_blocks` fixes
  the threshold, which turns that adjustment off;
- small blocks freed by threads (tokenizing a long prompt allocates millions) stay in those
  threads' arenas, between blocks still in use. `Trimmer` calls `malloc_trim` once a burst of
  such work is over (never more than once a second, and in a worker thread: it takes tens of
  milliseconds on a fragmented arena).

Both are no-ops where the C library lacks them (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
import time
from typing import Any

__all__ = ["Trimmer", "return_large_blocks"]

_M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


def return_large_blocks(threshold: int = 128 * 1024) -> None:
    """Blocks of `threshold` bytes or more get their own mapping, unmapped when freed."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)


class Trimmer:
    """Counts jobs that allocate a lot; when the last one of a burst ends, trims the heap."""

    def __init__(self, min_interval: float = 1.0) -> None:
        self._trim = getattr(_libc(), "malloc_trim", None)
        self._lock = threading.Lock()
        self._active = 0
        self._last = -math.inf  # the first burst trims, however long ago the machine booted
        self.min_interval = min_interval
        self.trims = 0

    def started(self) -> None:
        with self._lock:
            self._active += 1

    def ended(self) -> None:
        """Call from the worker thread that did the job (the trim runs there, off the loop)."""
        with self._lock:
            self._active -= 1
            now = time.monotonic()
            due = self._active == 0 and now - self._last >= self.min_interval
            if due:
                self._last = now
        if due and self._trim is not None:
            self._trim(0)
            self.trims += 1
