"""CPU per message of the RPC path without sockets: one ``CircleProtocol`` fed raw frames.

    .venv/bin/python -m bench.rpc_frames [--messages 20000] [--repeat 5] [--random-mask]

Opens one connection in memory (a ``Clock``, a transport that drops what is written, no script
backend), then feeds it the same masked text frame ``--messages`` times per method (``whoami``,
``fetch_nonce`` with and without a key) and prints microseconds per message, the best of
``--repeat``: the figure that moves least on a shared machine, for comparing two trees
(docs/benchmarks.md, "The RPC path"). The rate limit is set out of reach and the nonce cap lifted,
as in bench/run.py; both are still consulted on every message.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from circles.backend.scripts import BackendUnavailable, IScriptRunner
from circles.protocol import CircleFactory
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.session.contracts import CONTRACTS
from circles.server.session.methods import Sessions

CIRCLE = "02" + "%064x" % 1
UPGRADE = (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


@implementer(IScriptRunner)
class _NoScripts:
    def is_connected(self) -> bool:
        return False

    def run(self, request):
        return fail(BackendUnavailable("none"))

    def enqueue_once(self, request, data_json, key, ttl):
        return fail(BackendUnavailable("none"))


class _Sink(StringTransport):
    def write(self, data: bytes) -> None:
        pass

    def unregisterProducer(self) -> None:
        self.producer = None


def _pubkey() -> str:
    import coincurve
    return coincurve.PrivateKey(b"\x07" * 32).public_key.format(compressed=True).hex()


def frame(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else b"\x81\xfe" + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--random-mask", action="store_true", help="a random masking key (browsers'); else all zero (the generators')")
    args = parser.parse_args()
    clock = Clock()
    clock.advance(1.7e9)
    gateway = Gateway(Config(rate_limit=1e9, max_nonces_per_session=1_000_000_000), clock, _NoScripts())
    factory = CircleFactory(Sessions(gateway, CONTRACTS))
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(_Sink())
    protocol.dataReceived(UPGRADE)
    mask = os.urandom(4) if args.random_mask else b"\0\0\0\0"
    requests = {
        "whoami": {"jsonrpc": "2.0", "id": 1, "method": "whoami"},
        "fetch_nonce": {"jsonrpc": "2.0", "id": 1, "method": "fetch_nonce"},
        "fetch_nonce {pubkey}": {"jsonrpc": "2.0", "id": 1, "method": "fetch_nonce", "params": {"pubkey": _pubkey()}},
    }
    figures = {}
    for name, request in requests.items():
        data = frame(json.dumps(request).encode(), mask)
        best = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            for _ in range(args.messages):
                protocol.dataReceived(data)
            best = min(best, (time.perf_counter() - started) / args.messages * 1e6)
        figures[name] = best
    print("  ".join(f"{name}: {us:.2f} us" for name, us in figures.items()))


if __name__ == "__main__":
    main()
