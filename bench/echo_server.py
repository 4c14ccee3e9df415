"""The server of the mesh-overhead benchmark: a grpc.aio server that echoes bytes.

    python -m bench.echo_server --listen 127.0.0.1:PORT

It answers `/shopmesh.search.v1.Search/GetProducts` (the method the orders
identity may call on search, so the sidecars' RBAC lets it through) with the
request's own bytes: no protobuf parsing, no interceptors, no storage. The
same process serves the direct and the meshed runs, so whatever differs
between them is the sidecars.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

SERVICE = "shopmesh.search.v1.Search"
METHOD = "GetProducts"
PATH = f"/{SERVICE}/{METHOD}"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"echo server: cannot bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
