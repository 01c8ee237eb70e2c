"""A worker that always fails at start the way a multi-threaded engine process can: its main
thread is gone a moment before the process can be reaped (the kernel shows the process as a
zombie while another thread is still finishing), the window in which `dynamo serve` used to lose
exits. Here the window is made wide on purpose: the main thread exits alone, and a helper thread
ends the process with status 3 a second later.

python -m fault_fakes.crashing --model-path PATH
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import time

from dynamo_core.mocker.main import Deployment, build_parser

__all__ = ["Deployment", "build_parser", "main"]

#: the `exit` system call (this thread only, unlike `exit_group`)
SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(platform.machine())


def _end_later() -> None:
    time.sleep(1.0)
    os._exit(3)


def main() -> int:
    build_parser().parse_or_exit()
    print("the engine could not start: failing as this test asks", file=sys.stderr, flush=True)
    if SYS_EXIT is None:
        return 3
    threading.Thread(target=_end_later).start()
    ctypes.CDLL(None, use_errno=True).syscall(SYS_EXIT, 0)  # the main thread ends here
    return 3  # not reached


if __name__ == "__main__":
    sys.exit(main())
