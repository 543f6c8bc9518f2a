"""What a process tells its operator about reaching its Redis: the first failure to reach it
(with what to check), credentials refused, and nothing while it retries (:class:`Reachability`);
:class:`Watched` reports each connection attempt of an endpoint to it."""

from __future__ import annotations

import os

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.backend.redis_url import RedisAddress
from circles.common.logs import Logger

log = Logger()


class Reachability:
    """What a process tells its operator about reaching its Redis, shared by its connections.

    Until the first connection is made, the first failed attempt is one line at warn, with the
    address (no credentials) and what to check; the attempts after it, one every couple of
    seconds, say nothing (``GET /ready`` tells meanwhile). Once connected, a lost connection is
    for the connection's user to tell (the dispatcher's and the worker's "lost the connection to
    Redis at ..." lines), and reconnecting is quiet too. A Redis that refuses the credentials is
    one line at error (txredisapi does not retry then).

    :param private: the address is the private Redis of a ``--state-dir`` (its socket), not
        a ``--redis-url``: the hint names the directory.
    :param starting: seconds during which failures are not told, the time the process's own
        private Redis may take to start (:data:`circles.backend.embedded.START_TIMEOUT`); 0 for
        a Redis that should be there already.
    """

    def __init__(self, address: RedisAddress, reactor, *, private: bool = False, starting: float = 0.0) -> None:
        self.address = address
        self.clock = reactor
        self.private = private
        self.starting = starting
        self._since = reactor.seconds()
        self.reached = False  # a connection was made
        self.told = False  # the failure to reach it was logged
        self.told_refused = False

    def hint(self) -> str:
        if self.address.sentinels:
            return (f"check that its Sentinels run and know a primary named {self.address.master!r}, and that "
                    f"--redis-url (or $CIRCLES_REDIS_URL) names them")
        if not self.private:
            return "check that it runs and that --redis-url (or $CIRCLES_REDIS_URL) names it"
        state_dir = os.path.dirname(self.address.path)  # type: ignore[type-var]  # a private Redis's socket
        if self.starting:
            return f"the private redis-server of --state-dir {state_dir} does not answer there (see above)"
        return f"is a circles server running with --state-dir {state_dir}? (else give --redis-url)"

    def failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # stopped trying: not Redis's doing
        if self.reached or self.told or self.clock.seconds() - self._since < self.starting:
            return
        self.told = True
        log.warn("cannot reach Redis at {redis}: {error}; {hint}. Retrying quietly until it answers",
                 redis=self.address.where(), error=_reason(failure), hint=self.hint())

    def connected(self) -> None:
        self.reached = True

    def refused(self, failure: Failure) -> None:
        """Redis answered but would not let us in (password, database): txredisapi gives up."""
        if self.told_refused:
            return
        self.told_refused = True
        log.error("Redis at {redis} refused the connection ({error}): check the credentials and database "
                  "of --redis-url, then restart (not retrying)", redis=self.address.where(),
                  error=failure.getErrorMessage().replace("Redis error: ", ""))


def _reason(failure: Failure) -> str:
    error = failure.value
    socket_error = getattr(error, "osError", None)  # ConnectError.osError: an errno
    if isinstance(socket_error, int):
        return os.strerror(socket_error)
    return getattr(error, "strerror", None) or str(error).strip().rstrip(".") or type(error).__name__


@implementer(IStreamClientEndpoint)
class Watched:
    """An endpoint that reports each attempt to a :class:`Reachability` and reads as its URL
    (Twisted's retry messages name the endpoint)."""

    def __init__(self, endpoint, address: RedisAddress, watch: Reachability | None) -> None:
        self._endpoint = endpoint
        self._where = address.where()
        self._watch = watch

    def connect(self, factory):
        d = self._endpoint.connect(factory)
        if self._watch is not None:
            d.addCallbacks(self._connected, self._failed)
        return d

    def _connected(self, protocol):
        assert self._watch is not None  # only then is this called
        self._watch.connected()
        return protocol

    def _failed(self, failure: Failure) -> Failure:
        assert self._watch is not None  # only then is this called
        self._watch.failed(failure)
        return failure

    def __repr__(self) -> str:
        return self._where
