"""Test helpers for webhooks: payloads, signing (Stripe's own library), an HTTP client."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
import uuid
from io import BytesIO

import stripe
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

STRIPE_SECRET = "whsec_test_" + "a1" * 16
STRIPE_SECRET_OLD = "whsec_test_" + "b2" * 16
IDENFY_SECRET = "idenfy-test-secret-" + "c3" * 8


def stripe_event(event_id: str | None = None, **extra) -> dict:
    event = {
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1_700_000_000,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": "pi_123", "object": "payment_intent", "amount": 2000, "currency": "eur",
                            "metadata": {"circle_note": "hello"}}},
    }
    event.update(extra)
    return event


def idenfy_callback(scan_ref: str | None = None, overall: str = "APPROVED", final: bool = True, **extra) -> dict:
    callback = {
        "final": final,
        "platform": "PC",
        "status": {"overall": overall, "suspicionReasons": [], "denyReasons": [], "fraudTags": [],
                   "mismatchTags": [], "autoFace": "FACE_MATCH", "manualFace": "FACE_MATCH",
                   "autoDocument": "DOC_VALIDATED", "manualDocument": "DOC_VALIDATED"},
        "data": {"docFirstName": "JOHN", "docLastName": "DOE", "docNumber": "XXXXXXXX", "docDob": "1990-01-01",
                 "docType": "ID_CARD", "docNationality": "LT"},
        "fileUrls": {"FRONT": "https://s3.eu-west-1.amazonaws.com/production.users.storage/front.png"},
        "scanRef": scan_ref or str(uuid.uuid4()),
        "clientId": "circle-user-1",
        "startTime": 1_700_000_000,
        "finishTime": 1_700_000_100,
    }
    callback.update(extra)
    return callback


def encode(payload) -> bytes:
    return json.dumps(payload).encode("utf-8")


def stripe_headers(body: bytes, secret: str = STRIPE_SECRET, timestamp: int | None = None) -> dict:
    """``Stripe-Signature`` computed by stripe-python's own helper (its payload is text)."""
    header = stripe.WebhookSignature.generate_signature_header(body.decode("utf-8"), secret, timestamp=timestamp)
    return {"Stripe-Signature": header, "Content-Type": "application/json; charset=utf-8"}


def idenfy_headers(body: bytes, secret: str = IDENFY_SECRET) -> dict:
    """iDenfy publishes no signing library; its documented scheme is hex HMAC-SHA256 of the body."""
    return {"Idenfy-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json"}


class Reply:
    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<Reply {self.code} {self.body[:200]!r}>"


async def post(port: int, path: str, body: bytes = b"", headers: dict | None = None,
               method: bytes = b"POST") -> Reply:
    """One HTTP request to the server on 127.0.0.1:``port``."""
    agent = Agent(reactor)
    raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    producer = FileBodyProducer(BytesIO(body)) if method == b"POST" else None
    response = await agent.request(method, f"http://127.0.0.1:{port}{path}".encode(), raw, producer)
    done: Deferred = Deferred()
    response.deliverBody(_Collect(done))
    return Reply(response.code, response.headers, await done)


class _Collect(Protocol):
    """The whole response body (readBody warns about Agent's own transports)."""

    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data)


class _Raw(Protocol):
    def __init__(self, to_send: bytes, keep_sending: bytes, done: Deferred) -> None:
        self.to_send = to_send
        self.keep_sending = keep_sending
        self.done = done
        self.received = b""
        self.sent = 0

    def connectionMade(self) -> None:
        self.transport.write(self.to_send)
        self.sent = len(self.to_send)
        if self.keep_sending:
            self._more()

    def _more(self) -> None:
        # Keep feeding the body, a slice per reactor turn, as a client streaming a huge upload.
        if self.transport is None or self.done.called or not self.transport.connected:
            return
        self.transport.write(self.keep_sending)
        self.sent += len(self.keep_sending)
        reactor.callLater(0.001, self._more)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback((self.received, self.sent))


async def raw_exchange(port: int, to_send: bytes, keep_sending: bytes = b"") -> tuple[bytes, int]:
    """Send raw bytes (then ``keep_sending`` again and again until the server closes); return
    everything the server answered before closing and how many bytes were sent."""
    done: Deferred = Deferred()
    factory = ClientFactory.forProtocol(lambda: _Raw(to_send, keep_sending, done))
    reactor.connectTCP("127.0.0.1", port, factory)
    return await done


def post_sync(port: int, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    """POST from a plain blocking client (urllib), as a provider would: (status, JSON answer)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
