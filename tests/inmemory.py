"""Small helpers shared by the in-memory tests."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List

from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure


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
def captured_log() -> Iterator[List[dict]]:
    """Collect every twisted.logger event emitted inside the block."""
    events: List[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
