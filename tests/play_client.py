"""Test helpers: an Autobahn WebSocket client speaking JSON-RPC, and polling without sleeps."""

from __future__ import annotations

import itertools
import json
import time

import coincurve
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater


async def eventually(predicate, timeout: float = 30.0, interval: float = 0.02):
    """Poll ``predicate`` (sync) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await deferLater(reactor, interval, lambda: None)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class _RPC(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        message = json.loads(payload)
        waiter = self.factory.waiting.pop(message.get("id"), None)
        if waiter is not None:
            waiter.callback(message)

    def onClose(self, wasClean, code, reason):
        self.factory.closed_code = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        waiting, self.factory.waiting = self.factory.waiting, {}
        for d in waiting.values():
            d.errback(ConnectionError(f"closed: {code} {reason}"))


class RPCClient:
    """One WebSocket connection to ``/{circle}``; :meth:`call` returns the JSON-RPC response."""

    def __init__(self, port: int, circle: str, protocols: list[str] | None = None) -> None:
        url = f"ws://127.0.0.1:{port}/{circle}"
        self.factory = WebSocketClientFactory(url, protocols=protocols)
        self.factory.protocol = _RPC
        self.factory.opened = Deferred()
        self.factory.waiting = {}
        self.factory.closed_code = None  # the close code the server sent, once closed
        self._ids = itertools.count(1)
        connectWS(self.factory)

    @classmethod
    async def open(cls, port: int, circle: str, protocols: list[str] | None = None) -> RPCClient:
        """Connected, offering the WebSocket ``protocols`` if given (``circles-hero.v1``: the hero contract)."""
        client = cls(port, circle, protocols)
        client.protocol = await client.factory.opened
        return client

    @property
    def closed_code(self):
        return self.factory.closed_code

    def call(self, method: str, params=None) -> Deferred:
        request_id = next(self._ids)
        d = Deferred()
        self.factory.waiting[request_id] = d
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.protocol.sendMessage(json.dumps(message).encode())
        return d

    async def authenticate(self, key: coincurve.PrivateKey) -> str:
        pubkey = key.public_key.format().hex()
        nonce = (await self.call("fetch_nonce", {"pubkey": pubkey}))["result"]
        nonce = nonce if isinstance(nonce, str) else nonce["nonce"]  # the hero contract answers the string
        signature = key.sign(nonce.encode()).hex()  # DER ECDSA over SHA-256
        reply = await self.call("authenticate", {"pubkey": pubkey, "signature": signature})
        assert reply["result"] is True or reply["result"]["authenticated"], reply
        return pubkey

    def close(self) -> None:
        self.protocol.sendClose()


def new_key() -> coincurve.PrivateKey:
    return coincurve.PrivateKey()


def pk(key: coincurve.PrivateKey) -> str:
    return key.public_key.format().hex()
