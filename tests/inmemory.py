"""Small helpers shared by the in-memory tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from twisted.internet.defer import Deferred, fail
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.backend.scripts import BackendUnavailable, IScriptRunner, ScriptRequest
from circles.server.gateway import Gateway
from circles.server.session.contracts import CONTRACTS
from circles.server.session.methods import Session, Sessions


@implementer(IScriptRunner)
class NoScriptBackend:
    """A script backend that refuses every script at once: for tests of everything but play."""

    def __init__(self, reason: str = "no script backend is configured") -> None:
        self.reason = reason

    def is_connected(self) -> bool:
        return False

    def run(self, request: ScriptRequest) -> Deferred:
        return fail(BackendUnavailable(self.reason))

    def enqueue_once(self, request: ScriptRequest, data_json: str, key: str, ttl: int) -> Deferred:
        return fail(BackendUnavailable(self.reason))


def session_layer(gateway: Gateway) -> Sessions:
    """The session layer on ``gateway``, speaking every contract, as the composition root builds it."""
    return Sessions(gateway, CONTRACTS)


def open_session(gateway: Gateway, circle: str, **kwargs) -> Session:
    """A session on ``circle`` opened as a connection opens one (the server's default contract
    unless ``contract=`` says otherwise)."""
    return session_layer(gateway).open(circle, **kwargs)


def fired(d: Deferred):
    """The result of a Deferred that has already fired; re-raises its failure."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def replied(reply):
    """The reply text of an ``answer()`` (the session's or the JSON-RPC dispatcher's), taken as the
    protocol takes it: given at once, or by a Deferred that has already fired."""
    return fired(reply) if isinstance(reply, Deferred) else reply


@contextmanager
def captured_log() -> Iterator[list[dict]]:
    """Collect every twisted.logger event emitted inside the block."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
