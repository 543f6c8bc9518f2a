"""The first-bytes router: circle upgrades straight to Autobahn, everything else to the Site."""

from __future__ import annotations

import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from circles import CirclesService, Config
from circles.scripts import NoScriptBackend
from circles.upgrade import MAX_HEAD, is_circle_upgrade

from .support import Key

CIRCLE = Key().pubkey
UPGRADE = (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


@pytest.mark.parametrize("head, expected", [
    (UPGRADE[:-4], True),
    (UPGRADE[:-4].replace(b"Upgrade: websocket", b"UPGRADE:  WebSocket "), True),
    (UPGRADE[:-4].replace(f"/{CIRCLE}".encode(), f"/{CIRCLE}?pubkey=x&sig=y&nonce=z".encode()), True),
    (UPGRADE[:-4].replace(b"Upgrade: websocket", b"Upgrade: h2c"), False),
    (UPGRADE[:-4].replace(b"Upgrade: websocket\r\n", b""), False),
    (UPGRADE[:-4].replace(b"GET ", b"POST "), False),
    (UPGRADE[:-4].replace(f"/{CIRCLE}".encode(), b"/webhooks/stripe/x"), False),
    (UPGRADE[:-4].replace(f"/{CIRCLE}".encode(), f"/{CIRCLE}/extra".encode()), False),
    (b"garbage", False),
])
def test_is_circle_upgrade(head, expected):
    assert is_circle_upgrade(head) is expected


def _exchange(port: int, chunks: list, pause: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for chunk in chunks:
            s.sendall(chunk)
            time.sleep(pause)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


@pytest_twisted.async_yield_fixture
async def port():
    service = CirclesService(Config(circles=[CIRCLE], listen=("tcp:0:interface=127.0.0.1",), handshake_timeout=5),
                             reactor=reactor, scripts=NoScriptBackend())
    service.startService()
    [listening] = await service.when_listening()
    yield listening.getHost().port
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_upgrade_sent_in_pieces_is_routed_whole(port):
    answer = await threads.deferToThread(_exchange, port, [UPGRADE[:10], UPGRADE[10:50], UPGRADE[50:]], 0.05)
    assert answer.startswith(b"HTTP/1.1 101 ")


@pytest_twisted.ensureDeferred
async def test_other_requests_reach_the_site(port):
    answer = await threads.deferToThread(_exchange, port, [b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 200 ")
    # A circle path without the upgrade is the Site's too: the WebSocket resource asks for one.
    answer = await threads.deferToThread(_exchange, port, [f"GET /{CIRCLE} HTTP/1.1\r\nHost: x\r\n\r\n".encode()])
    assert answer.startswith(b"HTTP/1.1 426 ")


@pytest_twisted.ensureDeferred
async def test_oversized_head_goes_to_the_site_and_is_refused(port):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n"
    answer = await threads.deferToThread(_exchange, port, [head])
    assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5"))
