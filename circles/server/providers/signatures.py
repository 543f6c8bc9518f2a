"""Checking the signatures Stripe and iDenfy put on their webhook deliveries.

Both are HMAC-SHA256 over the raw body with a shared secret, hex encoded, compared in constant
time by the standard library (:func:`hmac.compare_digest`); nothing here is hand-rolled crypto.

- Stripe: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]``, signed text ``"<t>.<body>"``.
  Any ``v1`` may match (Stripe sends several while an endpoint's secret is being rolled) and
  ``t`` must be within the tolerance of now, in the past or the future: an old delivery
  replayed by someone who recorded it is refused.
- iDenfy: ``Idenfy-Signature: <hex>``, signed text the body.

Every failure is a :class:`BadSignature` whose message is safe to return and log: it names what
is wrong, never a secret or the expected signature.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

#: Most ``v1`` entries looked at in one Stripe header (bounds the work per request).
MAX_SIGNATURES = 16

_HEX_SHA256 = re.compile(rb"[0-9a-fA-F]{64}")
_DIGITS = re.compile(rb"[0-9]{1,12}")


class BadSignature(Exception):
    """The delivery is not proven to come from the provider (answered 401)."""


def _hmac_hex(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode("ascii")


def _any_match(secrets: Iterable[bytes], message: bytes, signatures: list[bytes]) -> bool:
    matched = False
    for secret in secrets:
        expected = _hmac_hex(secret, message)
        for signature in signatures:
            # No early exit: the time taken does not depend on which secret or entry matched.
            matched |= hmac.compare_digest(expected, signature)
    return matched


def parse_stripe_header(header: bytes) -> tuple[int, list[bytes]]:
    """``(t, [v1, ...])`` from a ``Stripe-Signature`` value; other schemes (``v0``) are ignored."""
    timestamp: int | None = None
    signatures: list[bytes] = []
    for item in header.split(b","):
        name, sep, value = item.strip().partition(b"=")
        if not sep:
            raise BadSignature("malformed Stripe-Signature header")
        if name == b"t":
            if timestamp is not None or not _DIGITS.fullmatch(value):
                raise BadSignature("malformed Stripe-Signature header: bad t")
            timestamp = int(value)
        elif name == b"v1":
            if not _HEX_SHA256.fullmatch(value):
                raise BadSignature("malformed Stripe-Signature header: bad v1")
            signatures.append(value.lower())
    if timestamp is None:
        raise BadSignature("malformed Stripe-Signature header: no t")
    if not signatures:
        raise BadSignature("malformed Stripe-Signature header: no v1 signature")
    if len(signatures) > MAX_SIGNATURES:
        raise BadSignature("malformed Stripe-Signature header: too many signatures")
    return timestamp, signatures


def verify_stripe(header: bytes | None, body: bytes, secrets: Iterable[bytes], *, now: float,
                  tolerance: float) -> int:
    """Check a Stripe delivery; return its timestamp ``t`` or raise :class:`BadSignature`."""
    if not header:
        raise BadSignature("missing Stripe-Signature header")
    timestamp, signatures = parse_stripe_header(header)
    if not _any_match(secrets, b"%d." % timestamp + body, signatures):
        raise BadSignature("no valid signature")
    # Checked after the signature, so the answer says nothing about unsigned timestamps.
    if abs(now - timestamp) > tolerance:
        raise BadSignature("timestamp outside the tolerance")
    return timestamp


def verify_idenfy(header: bytes | None, body: bytes, secrets: Iterable[bytes]) -> None:
    """Check an iDenfy delivery; raise :class:`BadSignature` unless it is signed."""
    if not header:
        raise BadSignature("missing Idenfy-Signature header")
    signature = header.strip()
    if not _HEX_SHA256.fullmatch(signature):
        raise BadSignature("malformed Idenfy-Signature header")
    if not _any_match(secrets, body, [signature.lower()]):
        raise BadSignature("no valid signature")
