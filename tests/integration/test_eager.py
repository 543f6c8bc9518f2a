"""The service accepts with EagerServer connections (EagerServer itself on loopback sockets:
tests/unit/test_eager.py)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from circles import CirclesService, Config
from circles.server.http.eager import EagerServer

from ..support import Key


@pytest_twisted.ensureDeferred
async def test_the_service_accepts_with_eager_connections(start):
    circle = Key()
    service = start(CirclesService(Config(circles=[circle.pubkey], listen=("tcp:0:interface=127.0.0.1",)),
                                   reactor=reactor))
    [port] = await service.when_listening()
    assert issubclass(port.transport, EagerServer)  # counted by the accept gate, eager all the same
