"""The multi-node walk-through on one machine: etcd + NATS, then `dynamo serve --only` twice."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

import openai
import pytest

from dynamo_core.testing.procs import run_python
from dynamo_core.testing.servers import EtcdServer, NatsServer, free_port, require_binary

ROOT = Path(__file__).parents[1]
AGG = str(ROOT / "examples" / "graphs" / "agg.yaml")


@pytest.mark.parametrize("plane", ["tcp", "nats"])
def test_serve_only_on_two_nodes(plane: str) -> None:
    require_binary("etcd")
    require_binary("nats-server")
    with ExitStack() as stack:
        etcd = stack.enter_context(EtcdServer())
        nats = stack.enter_context(NatsServer())
        namespace = f"mn{os.getpid()}{plane}"
        env = {
            "ETCD_ENDPOINTS": etcd.url,
            "NATS_SERVER": nats.url,
            "DYN_DISCOVERY_BACKEND": "etcd",
            "DYN_REQUEST_PLANE": plane,
            "DYN_EVENT_PLANE": plane,
        }
        port = free_port()
        common = [AGG, "--namespace", namespace, "--no-color"]
        workers = stack.enter_context(
            run_python(
                ["-m", "dynamo_serve", "serve", *common, "--only", "backend"], env=env, cwd=ROOT
            )
        )
        front = stack.enter_context(
            run_python(
                ["-m", "dynamo_serve", "serve", *common, "--only", "frontend",
                 "--frontend.http-port", str(port)],
                env=env,
                cwd=ROOT,
            )
        )  # fmt: skip
        workers.wait_for_line("stop: Ctrl-C", timeout=60)
        front.wait_for_line("stop: Ctrl-C", timeout=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 20
        while [m.id for m in client.models.list().data] != ["tiny"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        for proc in (front, workers):
            assert proc.stop() == 0, proc.output()
