"""A worker that starts a helper process in a session of its own (out of its process group) that
ignores SIGTERM: the kind of straggler the launcher's final sweep exists for.

python -m serve_fakes.forker --model-path PATH
"""

from __future__ import annotations

import subprocess
import sys

from serve_fakes.worker import Deployment, WorkerConfig, build_parser, worker

__all__ = ["Deployment", "WorkerConfig", "build_parser", "main"]

HELPER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('helper up', flush=True); time.sleep(600)"


def main() -> int:
    config = build_parser().parse_or_exit().config
    helper = subprocess.Popen([sys.executable, "-c", HELPER], start_new_session=True)
    print(f"helper pid {helper.pid}", flush=True)
    return worker.run(config)


if __name__ == "__main__":
    raise SystemExit(main())
