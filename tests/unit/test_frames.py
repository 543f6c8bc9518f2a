"""The short way a usual frame takes through the server (TrimmedServerProtocol.processData and
sendMessage), fed raw frames: what it answers, and that every other frame still goes Autobahn's
way, refused and closed as before."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from circles.protocol import CircleFactory
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.websocket import unmask

from ..inmemory import NoScriptBackend, session_layer

CIRCLE = "02" + "%064x" % 1
UPGRADE = (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def masked(payload: bytes, mask: bytes = b"\x12\x34\x56\x78", opcode: int = 1, fin: bool = True,
           length_bytes: int | None = None) -> bytes:
    """A client's frame: ``length_bytes`` 2 or 8 forces an extended length field."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 0x10000 else 8
    if length_bytes == 0:
        head += bytes([0x80 | n])
    elif length_bytes == 2:
        head += b"\xfe" + n.to_bytes(2, "big")
    else:
        head += b"\xff" + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame the server wrote."""
    out = []
    while data:
        opcode, n, i = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, i = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, i = int.from_bytes(data[2:10], "big"), 10
        out.append((opcode, data[i:i + n]))
        data = data[i + n:]
    return out


class Transport(StringTransport):
    """The HTTP channel is no producer here: the protocol unregisters it as it opens."""

    def unregisterProducer(self) -> None:
        self.producer = None


def open_connection(**config):
    clock = Clock()
    factory = CircleFactory(session_layer(Gateway(Config(**config), clock, NoScriptBackend())))
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = Transport()
    protocol.makeConnection(transport)
    protocol.dataReceived(UPGRADE)
    assert b"101 Switching Protocols" in transport.value()
    transport.clear()
    return protocol, transport


def request(method: str, id_, **extra) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "id": id_, **extra}).encode()


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 1000, 70000])
def test_unmask_is_the_rfc_xor(size):
    payload, mask = os.urandom(size), os.urandom(4)
    assert unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_frames_in_one_read_with_a_partial_one_are_all_answered_in_order():
    protocol, transport = open_connection()
    small = masked(request("whoami", 1))
    padded = masked(request("whoami", "x" * 300), mask=os.urandom(4))  # a 16-bit length
    third = masked(request("whoami", 3), mask=b"\0\0\0\0")
    protocol.dataReceived(small + padded + third[:5])
    protocol.dataReceived(third[5:])
    replies = [json.loads(p) for opcode, p in frames(transport.value())]
    assert [r["id"] for r in replies] == [1, "x" * 300, 3]
    assert all(r["result"]["circle"] == CIRCLE for r in replies)
    assert len(transport.value()) > 300 + 4  # the long reply's 16-bit length header was parsed above


def test_a_reply_of_a_16_bit_length_is_framed_so():
    protocol, transport = open_connection()
    protocol.dataReceived(masked(request("whoami", "y" * 200)))
    (opcode, payload), = frames(transport.value())
    assert opcode == 1 and transport.value()[1] == 126 and json.loads(payload)["id"] == "y" * 200


def test_invalid_utf8_in_one_frame_closes_1007():
    protocol, transport = open_connection()
    protocol.dataReceived(masked(b'{"jsonrpc":"2.0","method":"whoami","id":"\xed\xa0\x80"}'))  # a surrogate
    (opcode, payload), = frames(transport.value())
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1007


def test_a_frame_over_the_size_limit_closes_1009_and_is_not_answered():
    protocol, transport = open_connection(max_message_size=4096)
    protocol.dataReceived(masked(request("whoami", "z" * 5000)))
    (opcode, payload), = frames(transport.value())
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1009


def test_a_length_not_minimally_encoded_closes_1002():
    protocol, transport = open_connection()
    protocol.dataReceived(masked(request("whoami", 1), length_bytes=2))
    (opcode, payload), = frames(transport.value())
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1002


def test_an_unmasked_frame_closes_1002():
    protocol, transport = open_connection()
    text = request("whoami", 1)
    protocol.dataReceived(bytes([0x81, len(text)]) + text)
    (opcode, payload), = frames(transport.value())
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1002


def test_a_binary_frame_closes_1003():
    protocol, transport = open_connection()
    protocol.dataReceived(masked(request("whoami", 1), opcode=2))
    (opcode, payload), = frames(transport.value())
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1003


def test_a_ping_between_requests_is_answered_in_turn():
    protocol, transport = open_connection()
    protocol.dataReceived(masked(request("whoami", 1)) + masked(b"hi", opcode=9) + masked(request("whoami", 2)))
    got = frames(transport.value())
    assert [o for o, _ in got] == [1, 10, 1]
    assert got[1][1] == b"hi" and [json.loads(p)["id"] for o, p in got if o == 1] == [1, 2]


# -- the short way and Autobahn's way answer alike -------------------------------------------------

def _autobahn_only(monkeypatch) -> None:
    """Every frame Autobahn's way: the short way's overrides taken out (for the other side)."""
    from autobahn.websocket.protocol import WebSocketProtocol

    from circles.server.websocket import TrimmedServerProtocol
    monkeypatch.setattr(TrimmedServerProtocol, "processData", WebSocketProtocol.processData)
    monkeypatch.setattr(TrimmedServerProtocol, "sendMessage", WebSocketProtocol.sendMessage)


def _random_stream(rng) -> bytes:
    """Frames a client might send, good and bad: requests with deterministic answers, invalid
    UTF-8, reserved bits, other opcodes, fragments, unmasked frames, long lengths."""
    out = b""
    for _ in range(rng.randrange(1, 8)):
        kind = rng.randrange(10)
        mask = bytes(rng.randrange(256) for _ in range(4))
        body = request(rng.choice(["whoami", "nope", "play"]), rng.randrange(1000),
                       **({"params": {"x": "é" * rng.randrange(0, 300)}} if rng.random() < 0.5 else {}))
        if kind == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))  # often not UTF-8
        frame = masked(body, mask, length_bytes=rng.choice([None, None, None, 2]))
        if kind == 1:
            frame = bytes([frame[0] | rng.choice([0x40, 0x20, 0x10])]) + frame[1:]  # a reserved bit
        elif kind == 2:
            frame = masked(body, mask, opcode=rng.choice([0, 2, 3, 9, 10]))
        elif kind == 3:
            half = len(body) // 2
            frame = masked(body[:half], mask, fin=False) + masked(body[half:], mask, opcode=0)
        elif kind == 4:
            frame = bytes([frame[0], frame[1] & 0x7F]) + frame[6:]  # unmasked (the mask bytes gone)
        elif kind == 5:
            frame = masked(body, mask, length_bytes=8)  # a 64-bit length for a short payload
        out += frame
    return out


@pytest.mark.parametrize("seed", range(60))
def test_the_short_way_answers_as_autobahns_way(seed, monkeypatch):
    import random

    def run(stream: bytes, cuts: list[int]) -> tuple[bytes, bool]:
        protocol, transport = open_connection(max_message_size=2000)
        last = 0
        for cut in [*cuts, len(stream)]:
            protocol.dataReceived(stream[last:cut])
            last = cut
        return transport.value(), transport.disconnecting

    rng = random.Random(seed)
    stream = _random_stream(rng)
    cuts = sorted(rng.sample(range(1, len(stream)), min(3, len(stream) - 1)))
    short = run(stream, cuts)
    _autobahn_only(monkeypatch)
    assert run(stream, cuts) == short
