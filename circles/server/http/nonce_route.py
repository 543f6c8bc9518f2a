"""Authentication outside JSON-RPC, for the ecosystem's earlier clients: ``/auth/...``.

``GET /auth/nonce?public_key=<hex>`` issues a nonce from the gateway's HTTP store (there is no
connection yet to bind it to): Redis on a server that has one, so that the WebSocket may land on
any process of the server, or on any server sharing the Redis (:mod:`circles.server.access.redis_nonces`);
else this process's memory. The client signs it and opens the WebSocket with
``?pubkey=<hex>&sig=<hex>&nonce=<nonce>`` (see ``protocol.py``), or names it in the
``authenticate`` method on any connection. ``GET /auth/health`` reports
``active_nonces``, the live nonces this process issued (each process counts its own). Answers
are JSON; errors are ``{"error": reason}`` with a 4xx status, or 503 with ``Retry-After`` when
Redis cannot store the nonce (unreachable, not answering, or full).

What one process issues is bounded in all and per client address (an IPv6 client by its /64,
which one host usually holds whole): 429 past either, so one client cannot lock the others out.
"""

from __future__ import annotations

import math

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from circles.backend.scripts import BackendFull, BackendUnavailable
from circles.common.keys import InvalidKey, normalize_pubkey
from circles.common.logs import Logger
from circles.server.access.limits import address_key
from circles.server.access.nonces import Nonce, TooManyNonces, TooManyNoncesForOwner
from circles.server.gateway import Gateway
from circles.server.http.responses import json_response

log = Logger()
#: Seconds a client refused a nonce because Redis cannot store it (503) is told to wait.
RETRY_UNAVAILABLE = 5


def client_of(request) -> str | None:
    """Whom a request's nonces count against: its peer address, an IPv6 one as its /64
    (:func:`~circles.server.access.limits.address_key`)."""
    return address_key(getattr(request.getClientAddress(), "host", None))


def _answer(request, status: int, body: dict) -> bytes:
    # Spaced JSON, as these routes have always answered (the README shows it).
    return json_response(request, status, body, compact=False)


class AuthRoutes:
    """The Klein app to mount at ``/auth``: ``AuthRoutes(gateway).app.resource()``."""

    app = Klein()

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @app.route("/nonce", methods=["GET"])
    def nonce(self, request) -> Deferred | bytes:
        given = request.args.get(b"public_key", [b""])[0].decode("utf-8", "replace")
        pubkey = None
        if given:
            try:
                pubkey = normalize_pubkey(given)
            except InvalidKey as e:
                return _answer(request, 400, {"error": f"public_key: {e}"})
        d = self.gateway.http_nonces.issue(pubkey, client_of(request))
        d.addCallbacks(self._issued, self._refused, callbackArgs=(request,), errbackArgs=(request,))
        return d

    def _issued(self, issued: Nonce, request) -> bytes:
        return _answer(request, 200, {"nonce": issued.value, "expires_at": issued.expires_at})

    def _refused(self, failure: Failure, request) -> bytes | None:
        if failure.check(TooManyNonces):
            request.setHeader(b"retry-after", str(math.ceil(self.gateway.config.nonce_ttl)).encode())
            whose = " from this address" if failure.check(TooManyNoncesForOwner) else ""
            return _answer(request, 429, {"error": f"too many outstanding nonces{whose}, retry later"})
        if failure.check(CancelledError):  # the client left: nobody to answer
            return None
        if failure.check(BackendUnavailable):
            request.setHeader(b"retry-after", str(RETRY_UNAVAILABLE).encode())
            why = "the nonce store is full" if failure.check(BackendFull) else "the nonce store is unavailable"
            return _answer(request, 503, {"error": f"{why}, retry later"})
        log.failure("GET /auth/nonce failed", failure)
        return _answer(request, 500, {"error": "internal error"})

    @app.route("/health", methods=["GET"])
    def health(self, request) -> bytes:
        # active_nonces: what this process issued and is live (each process of a server counts its own).
        return _answer(request, 200, {"status": "healthy", "active_nonces": self.gateway.http_nonces.live(),
                                      "timestamp": int(self.gateway.clock.seconds())})
