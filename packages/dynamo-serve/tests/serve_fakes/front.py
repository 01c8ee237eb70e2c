"""A fake frontend: `GET /health` answers 200 once a `generate` instance is live; `GET /call`
forwards one request to a worker and answers with its reply.

python -m serve_fakes.front --http-port PORT [--target backend]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.deploy import BaseDeployment
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, dynamo_worker


class Deployment(BaseDeployment):
    name = "fake-front"
    health_http_port_arg = "http-port"


class FrontConfig(RuntimeConfig):
    http_port: int = Field(8000, description="HTTP port.")
    target: str = Field("backend", description="Component whose generate endpoint is called.")


def build_parser() -> DynFlexibleArgumentParser[FrontConfig]:
    return DynFlexibleArgumentParser(FrontConfig, prog="serve_fakes.front")


@dynamo_worker()
async def front(runtime: DistributedRuntime, config: FrontConfig) -> None:
    client = await runtime.endpoint(f"{config.namespace}.{config.target}.generate").client()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split()[1].decode() if len(line.split()) > 1 else "/"
            if path == "/health":
                ok = bool(client.instance_ids())
                status, body = (200, b"ok") if ok else (503, b"no workers")
            elif path == "/call":
                items = [i async for i in await client.round_robin({"hello": 1})]
                status, body = 200, json.dumps(items).encode()
            else:
                status, body = 404, b"not found"
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", config.http_port)
    print(f"fake front {os.getpid()} on port {config.http_port}", flush=True)
    await runtime.wait_for_shutdown()
    server.close()
    await client.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    return front.run(build_parser().parse_or_exit().config)


if __name__ == "__main__":
    raise SystemExit(main())
