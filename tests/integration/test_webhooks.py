"""A webhook refusal over real TLS, with a recording script backend.

The endpoints over plain loopback HTTP are in tests/unit/test_webhooks.py; Redis, the reference
worker and twistd in test_webhooks_e2e.py.
"""

from __future__ import annotations

import socket
import ssl

import pytest_twisted
from twisted.internet import reactor
from twisted.internet import ssl as tssl
from twisted.internet.threads import deferToThread

from circles.protocol import CircleFactory
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.providers.secrets import WebhookSecrets
from circles.service import build_site
from devtools.webhook_support import STRIPE_SECRET

from ..inmemory import session_layer
from ..unit.test_webhooks import CIRCLE, Recorder, head


@pytest_twisted.ensureDeferred
async def test_413_over_tls(tls_files):
    """TLS has no half-close: the answer still arrives whole before the connection ends."""
    config = Config(circles=[CIRCLE], stripe_secrets=WebhookSecrets.of(STRIPE_SECRET), max_request_body=1000)
    site = build_site(CircleFactory(session_layer(Gateway(config, reactor, Recorder()))), reactor)
    with open(tls_files["combined"]) as f:
        certificate = tssl.PrivateCertificate.loadPEM(f.read())
    port = reactor.listenSSL(0, site, certificate.options(), interface="127.0.0.1")
    try:
        def exchange() -> bytes:
            context = ssl.create_default_context(cafile=tls_files["ca"])
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(head(f"/webhooks/stripe/{CIRCLE}", 10 * 2**30) + b"x" * 5000)
                answer = b""
                while not answer.endswith(b"}"):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                return answer
        answer = await deferToThread(exchange)
        assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b'{"error":"request body too large"}')
    finally:
        await port.stopListening()
