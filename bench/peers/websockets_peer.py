"""Peer for the benchmark: the three circles methods on the ``websockets`` library (asyncio).

    python bench/peers/websockets_peer.py --port 9001

Prints ``READY websockets <port>`` once listening. Uses the library's defaults except the
1 MiB message limit (the same as circles); keepalive pings stay on as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import app
from app import MAX_MESSAGE_SIZE, Connection, circle_from_path
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


def process_request(connection, request):
    """Refuse the opening handshake with 404 unless the path names a circle."""
    if circle_from_path(request.path) is None:
        return connection.respond(http.HTTPStatus.NOT_FOUND, "No such circle\n")
    return None


async def handler(websocket) -> None:
    state = Connection(circle_from_path(websocket.request.path))
    try:
        async for message in websocket:
            if isinstance(message, bytes):
                await websocket.close(1003, "binary frames are not supported")
                return
            reply = state.handle(message)
            if reply is not None:
                await websocket.send(reply)
    except ConnectionClosed:
        pass


async def main(host: str, port: int) -> None:
    async with serve(handler, host, port, process_request=process_request,
                     max_size=MAX_MESSAGE_SIZE, server_header="websockets-peer") as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"READY websockets {bound}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-nonces", type=int, default=app.MAX_NONCES,
                        help="outstanding nonces per connection (default %(default)s, as circles)")
    args = parser.parse_args()
    app.MAX_NONCES = args.max_nonces
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
