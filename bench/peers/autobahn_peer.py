"""Peer for the benchmark: the three circles methods on a bare Autobahn/Twisted server.

    python bench/peers/autobahn_peer.py --port 9002

A ``WebSocketServerFactory`` and its protocol listening directly on TCP: no ``Site``, no
resource tree, no Deferreds in the request path. Prints ``READY autobahn <port>`` once
listening. The same message limit as circles.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import app
from app import MAX_MESSAGE_SIZE, Connection, circle_from_path
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor


class PeerProtocol(WebSocketServerProtocol):
    rpc = None  # the app.Connection (Autobahn uses self.state for its own)

    def onConnect(self, request):
        circle = circle_from_path(request.path)
        if circle is None:
            raise ConnectionDeny(404, "No such circle")
        self.rpc = Connection(circle)
        return None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.sendCloseFrame(1003, b"binary frames are not supported")
            return
        reply = self.rpc.handle(payload.decode("utf-8"))
        if reply is not None:
            self.sendMessage(reply.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-nonces", type=int, default=app.MAX_NONCES,
                        help="outstanding nonces per connection (default %(default)s, as circles)")
    args = parser.parse_args()
    app.MAX_NONCES = args.max_nonces
    factory = WebSocketServerFactory(server="autobahn-peer")
    factory.protocol = PeerProtocol
    factory.setProtocolOptions(maxMessagePayloadSize=MAX_MESSAGE_SIZE, maxFramePayloadSize=MAX_MESSAGE_SIZE)
    port = reactor.listenTCP(args.port, factory, interface=args.host)  # Twisted default backlog (50), as circles
    print(f"READY autobahn {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
