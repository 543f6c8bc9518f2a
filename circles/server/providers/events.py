"""Typed views of the webhook payloads, checked only after the signature is.

:class:`StripeEvent` is Stripe's Event envelope, :class:`IdenfyCallback` iDenfy's verification
result callback. Parsing checks the shape the gateway relies on (what names the event, what a
log line shows) and keeps every other field in ``extra``: providers add fields over time, and
refusing a delivery for an unknown field would make the provider retry it forever. The worker
receives the provider's body itself, byte for byte, not a re-encoding of these objects.

:meth:`dedupe_name` says which deliveries are the same event: Stripe's event ``id``; for iDenfy
the ``scanRef`` with the final status (``status.overall`` and ``final``), since one verification
legitimately produces several callbacks as its status moves on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, overload

import attrs

# The same bound as JSON-RPC messages: json's C decoder recurses once per level and stops only at
# the interpreter's recursion limit, which a library may have raised far past what the C stack
# holds (see circles.common.jsonrpc.parse).
from circles.common.fast_json import MAX_DEPTH, too_deep

#: ``status.overall`` values an iDenfy result callback carries (REVIEWING while a human reviews,
#: with ``final`` false).
IDENFY_STATUSES = frozenset({"APPROVED", "DENIED", "SUSPECTED", "EXPIRED", "REVIEWING"})


class BadEvent(ValueError):
    """The body is not JSON or not the provider's shape (answered 400); the message is safe to send."""


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadEvent(f"{what} must be an object")
    return value


@overload
def _string(obj: dict, name: str, what: str) -> str: ...
@overload
def _string(obj: dict, name: str, what: str, *, required: bool) -> str | None: ...
def _string(obj: dict, name: str, what: str, *, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise BadEvent(f"{what}{name} must be a non-empty string" if required else f"{what}{name} must be a string")
    return value


def _digest(*parts: str) -> str:
    """A fixed-size name for a provider-chosen identifier (bounded Redis key length)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def parse_json_object(body: bytes) -> dict:
    """The body as a JSON object; UTF-8 only (RFC 8259), so the worker gets the very same text."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEvent("body is not UTF-8") from None
    if too_deep(text):
        raise BadEvent(f"body nests deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise BadEvent("body is not JSON") from None
    return _object(value, "body")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@attrs.frozen
class StripeEvent:
    """Stripe's Event envelope (https://docs.stripe.com/api/events/object)."""

    id: str
    type: str
    created: int
    livemode: bool
    api_version: str | None
    object: dict  # data.object: the resource the event is about
    extra: dict = attrs.field(factory=dict)  # every other top-level field, as sent

    KNOWN = ("id", "type", "created", "livemode", "api_version", "data")

    @classmethod
    def parse(cls, body: bytes) -> StripeEvent:
        event = parse_json_object(body)
        data = _object(event.get("data"), "data")
        created = event.get("created")
        if not isinstance(created, int) or isinstance(created, bool):
            raise BadEvent("created must be an integer")
        livemode = event.get("livemode")
        if not isinstance(livemode, bool):
            raise BadEvent("livemode must be a boolean")
        return cls(
            id=_string(event, "id", ""),
            type=_string(event, "type", ""),
            created=created,
            livemode=livemode,
            api_version=_string(event, "api_version", "", required=False),
            object=_object(data.get("object"), "data.object"),
            extra={k: v for k, v in event.items() if k not in cls.KNOWN},
        )

    def dedupe_name(self, circle: str) -> str:
        return f"stripe:{circle}:{_digest(self.id)}"


@attrs.frozen
class IdenfyStatus:
    overall: str
    auto_document: str | None = None
    auto_face: str | None = None
    manual_document: str | None = None
    manual_face: str | None = None
    extra: dict = attrs.field(factory=dict)  # fraudTags, mismatchTags, denyReasons, ...

    KNOWN = {"overall": "overall", "autoDocument": "auto_document", "autoFace": "auto_face",
             "manualDocument": "manual_document", "manualFace": "manual_face"}

    @classmethod
    def parse(cls, value: Any) -> IdenfyStatus:
        status = _object(value, "status")
        overall = _string(status, "overall", "status.")
        if overall not in IDENFY_STATUSES:
            raise BadEvent(f"status.overall must be one of {', '.join(sorted(IDENFY_STATUSES))}")
        fields = {attr: _string(status, name, "status.", required=False)
                  for name, attr in cls.KNOWN.items() if name != "overall"}
        return cls(overall=overall, **fields,
                   extra={k: v for k, v in status.items() if k not in cls.KNOWN})


@attrs.frozen
class IdenfyCallback:
    """iDenfy's verification result callback (https://documentation.idenfy.com/callbacks/ResultCallback/)."""

    client_id: str
    scan_ref: str
    final: bool
    status: IdenfyStatus
    data: dict  # document and identity fields (docFirstName, docNumber, docDob, ...), as sent
    extra: dict = attrs.field(factory=dict)  # platform, startTime, fileUrls, AML, ...

    KNOWN = ("clientId", "scanRef", "final", "status", "data")

    @classmethod
    def parse(cls, body: bytes) -> IdenfyCallback:
        callback = parse_json_object(body)
        final = callback.get("final")
        if not isinstance(final, bool):
            raise BadEvent("final must be a boolean")
        data = callback.get("data")
        return cls(
            client_id=_string(callback, "clientId", ""),
            scan_ref=_string(callback, "scanRef", ""),
            final=final,
            status=IdenfyStatus.parse(callback.get("status")),
            data={} if data is None else _object(data, "data"),
            extra={k: v for k, v in callback.items() if k not in cls.KNOWN},
        )

    def dedupe_name(self, circle: str) -> str:
        return f"idenfy:{circle}:{_digest(self.scan_ref, self.status.overall, 'final' if self.final else 'interim')}"
