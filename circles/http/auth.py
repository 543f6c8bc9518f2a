"""Authentication outside JSON-RPC, for the ecosystem's earlier clients: ``/auth/...``.

``GET /auth/nonce?public_key=<hex>`` issues a nonce from the process-wide store (there is no
connection yet to bind it to); the client signs it and opens the WebSocket with
``?pubkey=<hex>&sig=<hex>&nonce=<nonce>`` (see ``protocol.py``). ``GET /auth/health`` reports
the store's size. Answers are JSON; errors are ``{"error": reason}`` with a 4xx status.

The store is bounded in all and per client address (an IPv6 client by its /64, which one host
usually holds whole): 429 past either, so one client cannot lock the others out.
"""

from __future__ import annotations

import math
from typing import Optional

from klein import Klein

from circles.auth import TooManyNonces, TooManyNoncesForOwner
from circles.gateway import Gateway
from circles.http.responses import json_response
from circles.keys import InvalidKey, normalize_pubkey
from circles.limits import address_key


def client_of(request) -> Optional[str]:
    """Whom a request's nonces count against: its peer address, an IPv6 one as its /64
    (:func:`~circles.limits.address_key`)."""
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
    def nonce(self, request) -> bytes:
        given = request.args.get(b"public_key", [b""])[0].decode("utf-8", "replace")
        pubkey = None
        if given:
            try:
                pubkey = normalize_pubkey(given)
            except InvalidKey as e:
                return _answer(request, 400, {"error": f"public_key: {e}"})
        try:
            issued = self.gateway.http_nonces.issue(pubkey, client_of(request))
        except TooManyNonces as e:
            request.setHeader(b"retry-after", str(math.ceil(self.gateway.config.nonce_ttl)).encode())
            whose = " from this address" if isinstance(e, TooManyNoncesForOwner) else ""
            return _answer(request, 429, {"error": f"too many outstanding nonces{whose}, retry later"})
        return _answer(request, 200, {"nonce": issued.value, "expires_at": issued.expires_at})

    @app.route("/health", methods=["GET"])
    def health(self, request) -> bytes:
        return _answer(request, 200, {"status": "healthy", "active_nonces": len(self.gateway.http_nonces),
                                      "timestamp": int(self.gateway.clock.seconds())})
