"""Stripe and iDenfy webhooks: ``POST /webhooks/stripe/{circle_pk}``, ``POST /webhooks/idenfy/{circle_pk}``.

Each delivery is checked in this order, and nothing is queued unless every check passes:
route and method (404, 405), the circle and whether the provider is configured for it (404:
a provider without a secret is off, never "accept unsigned"), the body size (413, enforced
while it arrives by :mod:`circles.server.http.request_limits`), the signature (401), then the payload's shape
(400: parsed only once it is known to come from the provider). A verified event becomes a task
on the circle's queue, with the event de-duplicated in the same atomic Redis step
(:meth:`~circles.backend.scripts.IScriptRunner.enqueue_once`), and is answered
``200 {"received": true, "task_id": ...}`` once Redis holds it (with replicated Redis, once
``--webhook-replicas`` replicas hold it too: a failover cannot lose it); the script's result is
not awaited (providers time out and retry). Redis unreachable, or the replicas not there or not
acknowledging in time: 503, so the provider retries later.

The task's script is fixed text per provider (:data:`STRIPE_SCRIPT`, :data:`IDENFY_SCRIPT`, or
the operator's ``--stripe-script`` / ``--idenfy-script``); the event travels separately as the
task's ``data``, the provider's body byte for byte. No event field is ever pasted into a script.
``docs/webhooks.md`` is the operator's guide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from werkzeug.exceptions import HTTPException

from circles.backend.scripts import SOURCE_IDENFY, SOURCE_STRIPE, BackendUnavailable, Queued, ScriptRequest
from circles.common.keys import InvalidKey, normalize_pubkey
from circles.common.logs import Logger
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.http.responses import json_response
from circles.server.providers.events import BadEvent, IdenfyCallback, StripeEvent
from circles.server.providers.secrets import WebhookSecrets
from circles.server.providers.signatures import BadSignature, verify_idenfy, verify_stripe

log = Logger()

#: What a worker runs for a Stripe event unless ``--stripe-script`` says otherwise. The event
#: is not in the text: the worker hands the task's data (the event's JSON) to the script as
#: ``CIRCLES_DATA``, and the circle's worker defines the handler.
STRIPE_SCRIPT = """\
// circles: a Stripe webhook event for this circle (docs/webhooks.md).
// The event's JSON is CIRCLES_DATA; this text is the same for every event.
on_stripe_event(CIRCLES_DATA)
"""

#: What a worker runs for an iDenfy verification callback unless ``--idenfy-script`` says otherwise.
IDENFY_SCRIPT = """\
// circles: an iDenfy verification callback for this circle (docs/webhooks.md).
// The callback's JSON is CIRCLES_DATA; this text is the same for every callback.
on_idenfy_callback(CIRCLES_DATA)
"""

RETRY_AFTER = b"30"  # seconds, with a 503: Redis is usually back by then


@attrs.frozen
class Provider:
    """What differs between the providers: how a delivery is verified and parsed."""

    name: str
    source: str
    secrets: WebhookSecrets
    script: str
    verify: Callable[[Any, bytes, tuple[bytes, ...]], None]  # (request, body, secrets); raises BadSignature
    parse: Callable[[bytes], Any]  # raises BadEvent; the result has dedupe_name(circle)
    describe: Callable[[Any], str]  # for the log: identifiers only, no personal data


def providers(config: Config, clock) -> dict[str, Provider]:
    def stripe_verify(request, body: bytes, secrets) -> None:
        verify_stripe(request.getHeader(b"stripe-signature"), body, secrets,
                      now=clock.seconds(), tolerance=config.webhook_tolerance)

    def idenfy_verify(request, body: bytes, secrets) -> None:
        verify_idenfy(request.getHeader(b"idenfy-signature"), body, secrets)

    return {
        "stripe": Provider("stripe", SOURCE_STRIPE, config.stripe_secrets,
                           config.stripe_script if config.stripe_script is not None else STRIPE_SCRIPT,
                           stripe_verify, StripeEvent.parse, lambda e: f"{e.type} {e.id}"),
        "idenfy": Provider("idenfy", SOURCE_IDENFY, config.idenfy_secrets,
                           config.idenfy_script if config.idenfy_script is not None else IDENFY_SCRIPT,
                           idenfy_verify, IdenfyCallback.parse,
                           lambda c: f"scanRef {c.scan_ref} {c.status.overall}{' final' if c.final else ''}"),
    }


def _read_body(request, limit: int) -> bytes | None:
    """The body, or None if it is over ``limit`` (only possible on a Site without
    :class:`~circles.server.http.request_limits.BoundedRequest`, which refuses such bodies earlier)."""
    request.content.seek(0)
    body = request.content.read(limit + 1)
    return None if len(body) > limit else body


class WebhookRoutes:
    """The Klein app to mount at ``/webhooks``: ``WebhookRoutes(gateway).app.resource()``."""

    app = Klein()

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.providers = providers(gateway.config, gateway.clock)

    def refuse(self, request, status: int, error: str, provider: str, circle: str, why: str = "") -> bytes:
        """Answer ``status`` with ``error``, counted, and logged within the gateway's budget:
        anyone may post here, as fast as they like (:mod:`circles.common.log_budget`). ``why`` is for
        the log only: what the operator needs and the caller does not."""
        self.gateway.metrics.webhooks.labels(provider, str(status)).inc()
        address = request.getClientAddress()
        self.gateway.http_log.note(getattr(address, "host", str(address)), f"{provider} {status}",
                                   "webhook {provider} for {circle} refused with {status}: {error}",
                                   provider=provider, circle=circle, status=status,
                                   error=f"{error} ({why})" if why else error)
        return json_response(request, status, {"error": error})

    @app.route("/<string:name>/<string:circle>")  # any method: a wrong one is 405 here, not 404
    def deliver(self, request, name: str, circle: str):
        provider = self.providers.get(name)
        if provider is None:
            return json_response(request, 404, {"error": "not found"})
        if request.method != b"POST":
            self.gateway.metrics.webhooks.labels(name, "405").inc()
            request.setHeader(b"allow", b"POST")
            return json_response(request, 405, {"error": "method not allowed, use POST"})
        config = self.config
        try:
            circle = normalize_pubkey(circle)
        except InvalidKey:
            return self.refuse(request, 404, "unknown circle", name, "?")
        if not config.serves(circle):
            return self.refuse(request, 404, "unknown circle", name, circle)
        secrets = provider.secrets.for_circle(circle)
        if not secrets:
            return self.refuse(request, 404, f"{name} webhooks are not configured", name, circle)
        body = _read_body(request, config.max_request_body)
        if body is None:
            return self.refuse(request, 413, "request body too large", name, circle)
        try:
            provider.verify(request, body, secrets)
        except BadSignature as e:
            return self.refuse(request, 401, str(e), name, circle)
        try:
            event = provider.parse(body)
        except BadEvent as e:
            return self.refuse(request, 400, str(e), name, circle)
        task = ScriptRequest(circle=circle, script=provider.script, caller="", source=provider.source,
                             timeout=config.webhook_deadline)
        queued = self.gateway.scripts.enqueue_once(task, body.decode("utf-8"), event.dedupe_name(circle),
                                                   config.webhook_dedupe_ttl)
        return ensureDeferred(self._answer(request, queued, provider, name, circle, event))

    async def _answer(self, request, queued: Deferred, provider: Provider, name: str, circle: str,
                      event: Any) -> bytes:
        """200 once the event is queued (Redis, and the replicas asked for, hold it); 503 if the
        backend is unavailable. Klein cancels the answer when the provider hangs up: that cancels
        the wait."""
        try:
            result: Queued = await queued
        except BackendUnavailable as e:
            request.setHeader(b"retry-after", RETRY_AFTER)
            return self.refuse(request, 503, "backend unavailable, retry later", name, circle, why=str(e))
        # At debug: one line per event would be the busiest line of the log; /metrics counts them.
        log.debug("webhook {provider} {event} for {circle}: {what} task {task}", provider=name,
                  event=provider.describe(event), circle=circle, task=result.task_id,
                  what="duplicate of" if result.duplicate else "queued as")
        self.gateway.metrics.webhooks.labels(name, "200").inc()
        answer = {"received": True, "task_id": result.task_id}
        if result.duplicate:
            answer["duplicate"] = True
        return json_response(request, 200, answer)

    @app.route("/", branch=True)
    def elsewhere(self, request) -> bytes:
        return json_response(request, 404, {"error": "not found"})

    @app.handle_errors(HTTPException)
    def http_error(self, request, failure) -> bytes:
        error = failure.value
        return json_response(request, error.code or 500, {"error": (error.name or "error").lower()})

    @app.handle_errors(Exception)
    def internal_error(self, request, failure) -> bytes:
        log.failure("webhook request failed", failure)
        return json_response(request, 500, {"error": "internal error"})
