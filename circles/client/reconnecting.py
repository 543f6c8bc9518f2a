"""A client that keeps a connection up: :class:`ReconnectingClient`.

It authenticates each new connection with a fresh nonce; given several servers' URLs for one
circle (a deployment without a load balancer), it moves on to the next, round robin, when one
fails; its ``play(timeout=...)`` bounds the whole call, waiting for a connection included
(:class:`NoServerReachable` when none comes in time). Each connection is one of
:mod:`circles.client.connection`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.client.connection import (
    DEFAULT_TIMEOUT,
    GOING_AWAY,
    CircleClient,
    ClientProtocol,
    ConnectionClosed,
    check_url,
    endpoint_for,
    websocket_factory,
)
from circles.client.diagnostics import ConnectFailed
from circles.client.signing import PrivateKeyLike, private_key, public_key

# Twisted's own Logger, as in circles.client.connection: the application's observers decide.
log = Logger()


class NoServerReachable(ConnectFailed):
    """A :class:`ReconnectingClient` got no live connection within a call's ``timeout``: none of
    its servers could be reached, or none let a WebSocket open (and authenticate). The message
    names each URL and why its last attempt failed."""


@implementer(IStreamClientEndpoint)
class _Rotating:
    """Each connection attempt to the next of several servers, round robin: the WebSocket
    factory's session parameters (URL, Host header, resource) are switched to that server's
    before connecting. ClientService makes one attempt at a time, so no attempt sees another's."""

    def __init__(self, targets: list[tuple[str, Any]], factory: WebSocketClientFactory,
                 failed: Callable[[str, Failure], None]) -> None:
        self._targets = targets  # (url, endpoint)
        self._factory = factory
        self._failed = failed  # told of each attempt that made no connection, before ClientService
        self._next = 0
        self.url: str = targets[0][0]  # the URL of the current or last attempt

    def connect(self, protocol_factory: IProtocolFactory) -> Deferred:
        self.url, endpoint = self._targets[self._next]
        self._next = (self._next + 1) % len(self._targets)
        f = self._factory
        f.setSessionParameters(url=self.url, origin=f.origin, protocols=f.protocols, useragent=f.useragent,
                               headers=f.headers, proxy=f.proxy)
        return endpoint.connect(protocol_factory).addErrback(self._attempt_failed, self.url)

    def _attempt_failed(self, failure: Failure, url: str) -> Failure:
        if not failure.check(CancelledError):  # cancelled: stopped, not a failure of the server's
            self._failed(url, failure)
        return failure


def check_urls(urls: str | Sequence[str]) -> list[str]:
    """``urls`` (one URL or several servers' URLs) as a list, each checked by :func:`check_url`;
    ValueError if there is none or they do not all name the same circle."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("no URL given: give at least one ws:// or wss://host:port/{circle_pk}")
    circles = {url: check_url(url) for url in urls}
    if len(set(circles.values())) > 1:
        raise ValueError("the URLs must all name the same circle (they are servers of one deployment): "
                         + ", ".join(f"{url} names {circle[:10]}…" for url, circle in circles.items()))
    return urls


class ReconnectingClient:
    """Keeps a connection to ``url`` up, authenticating every new one with a fresh nonce.

    ``url`` may be a sequence of URLs of the same circle on several servers (a deployment with no
    load balancer in front): the first attempt goes to the first, and after a failed attempt or a
    lost connection the next attempt goes to the next, round robin, so a client moves on when its
    server dies. :attr:`url` is the URL of the current (or last attempted) connection,
    :attr:`urls` all of them.

    Calls wait for a live (open and, if a key is given, authenticated) connection: for ever, or
    for ``timeout`` seconds where a call takes one (:meth:`client`, :meth:`play`), after which
    it fails with :class:`NoServerReachable`, saying why each server's last attempt failed. A
    call in flight when the connection drops fails with :class:`ConnectionClosed` and is not
    repeated; the next call goes over the new connection. Two exceptions, where repeating is
    safe: a call that never left (the connection was closing when it was made) waits for the
    next connection, ``play`` included (the server never saw it); and a call that only reads
    (:data:`RETRIED`: ``fetch_nonce``, ``whoami``, ``rpc.discover``) caught by a server going
    away (close code 1001: it is stopping, and sends that once what it took is answered) is made
    again on the next connection, without an error. A ``play`` caught in flight is never
    repeated for the caller: it fails with :class:`ConnectionClosed`. (From a circles server, one
    whose ``code`` is 1001 was not run: the server answers every call it took before it goes
    away, and takes none that crosses its close; the caller may send it again. Any other close
    leaves it unknown.) :meth:`start` begins connecting, :meth:`stop` ends it.

    Twisted's ``ClientService`` keeps the connection; this class makes it live. The service
    counts a connection as made once TCP (and TLS) is up, and the opening handshake and the
    authentication follow here: a ``prepareConnection`` that fails because the connection was
    lost leaves the service in a state (``Waiting``) where that same loss, reported next, is an
    error (``automat`` ``NoTransition``, logged as an unhandled error each time a load balancer
    with no backend or a draining server closed a connection before the WebSocket opened). An
    attempt that gives no live connection still counts as a failed one for ``retry_policy``,
    whose delays grow while no server lets a WebSocket open.
    """

    #: Calls that read only: made again when a server going away (1001) left them unanswered.
    RETRIED = frozenset({"fetch_nonce", "whoami", "rpc.discover"})
    #: How many connections a call follows before its failure is the caller's.
    MOST_ATTEMPTS = 3
    #: Seconds a connection must have lived for its server's 1001 to bring an immediate reconnection
    #: (one sent away sooner waits as after a failed attempt: no loop against a server that lets
    #: clients in only to send them away).
    SETTLED = 1.0

    def __init__(self, url: str | Sequence[str], *, reactor: Any, key: PrivateKeyLike | None = None,
                 scheme: str = "eth", ca: str | None = None, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, retry_policy: Callable[[int], float] | None = None) -> None:
        self.urls: list[str] = check_urls(url)
        self._reactor = reactor
        self._key = None if key is None else private_key(key)
        self._scheme = scheme
        self._policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30)
        self._unready = 0  # attempts in a row that gave no live connection
        self._went_away = False  # the last live connection, settled, was closed by its server going away (1001)
        self._live_since = 0.0
        self._why: dict[str, str] = {}  # each URL's last failed attempt, since the last live connection
        self._live: ClientProtocol | None = None
        self._waiters: list[Deferred] = []  # calls waiting for a live connection
        self._stopped = False
        #: Live connections made so far (open, and authenticated if a key is given).
        self.connections = 0
        factory = websocket_factory(self.urls[0], reactor, timeout)
        self._endpoint = _Rotating([(u, endpoint_for(u, reactor, ca=ca, insecure=insecure, timeout=timeout))
                                    for u in self.urls], factory, self._attempt_failed)
        # The service's own count of failed attempts restarts with every TCP connection; ours
        # restarts with every live one (1 after a live connection was lost, as the service's would).
        self._service = ClientService(self._endpoint, factory,
                                      retryPolicy=self._delay,
                                      clock=reactor, prepareConnection=self._prepare)

    @property
    def url(self) -> str:
        return self._endpoint.url

    def _prepare(self, protocol: Any) -> None:  # a ClientProtocol
        """Each new connection, as soon as TCP (and TLS) is up: its handshake and authentication
        go on in the background; the service takes the connection as made (see the class)."""
        ensureDeferred(self._make_live(protocol.opened, protocol.url))

    async def _make_live(self, opened: Deferred, url: str) -> None:
        protocol: ClientProtocol | None = None
        try:
            protocol = await opened
            if self._key is not None:
                await CircleClient(protocol).authenticate(self._key, self._scheme)
        except Exception:
            failure = Failure()
            log.warn("connecting to {url} failed: {error}", url=url, error=failure.getErrorMessage())
            self._attempt_failed(url, failure)
            if protocol is not None and protocol.state == protocol.STATE_OPEN:
                protocol.sendClose(1000)  # not used; the service tries again once it has closed
            return
        self._unready, self._why = 0, {}
        self._live = protocol
        self._live_since = self._reactor.seconds()
        self.connections += 1
        protocol.closed.when().addCallback(lambda closed: self._lost(protocol, closed[0]))
        log.info("connected to {url}", url=protocol.url)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._wrap(protocol))

    def _attempt_failed(self, url: str, failure: Failure) -> None:
        self._unready += 1
        self._why[url] = failure.getErrorMessage().removeprefix(f"cannot open {url}: ")

    def _lost(self, protocol: ClientProtocol, code: int | None) -> None:
        if self._live is protocol:
            self._live = None
            self._went_away = code == GOING_AWAY and self._reactor.seconds() - self._live_since >= self.SETTLED

    def _delay(self, _attempts: int) -> float:
        """Seconds before the next attempt: none after a server went away (it stopped on purpose,
        having answered all it took; another is up), else ``retry_policy``'s for the attempts in
        a row that gave no live connection."""
        if self._went_away and not self._unready:
            return 0.0
        return self._policy(max(1, self._unready))

    def _wrap(self, protocol: ClientProtocol) -> CircleClient:
        client = CircleClient(protocol)
        client.pubkey = None if self._key is None else public_key(self._key)
        return client

    def _unreachable(self, timeout: float) -> NoServerReachable:
        tried = "; ".join(f"{url}: {self._why.get(url, 'no attempt has finished yet')}" for url in self.urls)
        return NoServerReachable(f"no server was reachable within {timeout:g} s ({tried})")

    def start(self) -> None:
        self._stopped = False
        self._service.startService()

    def stop(self) -> Deferred:
        """Stop connecting and close the connection; calls still waiting for one fail with
        ``CancelledError``."""
        self._stopped = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.cancel()
        return self._service.stopService()

    def client(self, timeout: float | None = None) -> Deferred:
        """Fires with a :class:`CircleClient` on the current live connection, or the next one.

        ``timeout``: seconds to wait for one, after which it fails with :class:`NoServerReachable`
        (None: wait for as long as it takes). Fails with ``CancelledError`` once stopped.
        """
        if self._stopped:
            return fail(CancelledError(f"the client of {self.url} was stopped"))
        live = self._live
        if live is not None and live.state == live.STATE_OPEN:
            return succeed(self._wrap(live))
        waiter: Deferred = Deferred(self._forget)
        self._waiters.append(waiter)
        if timeout is not None:
            def unreachable(result: Any, timeout: float) -> Any:
                if isinstance(result, Failure) and result.check(CancelledError):
                    raise self._unreachable(timeout)
                return result

            waiter.addTimeout(timeout, self._reactor, onTimeoutCancel=unreachable)
        return waiter

    def _forget(self, waiter: Deferred) -> None:
        """A waiter cancelled (its timeout, its caller): nothing keeps it any more."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _via(self, method: str, *args: Any, rpc: str | None = None, **kwargs: Any) -> Deferred:
        """``method`` of the live connection's :class:`CircleClient`, made again on the next
        connection where that is safe (see the class); ``rpc``: the JSON-RPC method it calls."""
        return ensureDeferred(self._calling(method, rpc or method, args, kwargs))

    async def _calling(self, method: str, rpc: str, args: tuple, kwargs: dict) -> Any:
        for attempt in range(1, self.MOST_ATTEMPTS + 1):
            client = await self.client()
            try:
                return await getattr(client, method)(*args, **kwargs)
            except ConnectionClosed as e:
                again = not e.sent or (e.code == GOING_AWAY and rpc in self.RETRIED)
                if not again or attempt == self.MOST_ATTEMPTS:
                    raise
                log.info("{method} to {url} again on the next connection ({why})", method=rpc, url=client.url,
                         why="the server is going away" if e.sent else "it was not sent")

    def call(self, method: str, params: Any = None) -> Deferred:
        return self._via("call", method, params, rpc=method)

    def fetch_nonce(self, pubkey: str | None = None) -> Deferred:
        """``{nonce, expires_at}``; the nonce is bound to ``pubkey`` when given, and to the
        connection it was fetched on (another after a reconnection)."""
        return self._via("fetch_nonce", pubkey)

    def whoami(self) -> Deferred:
        return self._via("whoami")

    def play(self, script: str, timeout: float | None = None) -> Deferred:
        """Run ``script``; fires with its output.

        ``timeout`` (seconds) bounds the whole call: waiting for a live connection (past it,
        :class:`NoServerReachable`), then the play itself, sent with the time left as its own
        timeout, so the server answers -32003 when that runs out. None: the server's limit, and
        as long as it takes to connect.
        """
        if timeout is None:
            return self._via("play", script)
        return ensureDeferred(self._play_within(script, timeout))

    async def _play_within(self, script: str, timeout: float) -> str:
        deadline = self._reactor.seconds() + timeout
        for attempt in range(1, self.MOST_ATTEMPTS + 1):
            try:
                client = await self.client(timeout=max(deadline - self._reactor.seconds(), 0.001))
            except NoServerReachable:
                raise self._unreachable(timeout) from None  # the play's timeout, not what was left of it
            try:
                # What is left of it, and never 0 (the server refuses that): the connection came at the deadline.
                return await client.play(script, timeout=max(deadline - self._reactor.seconds(), 0.001))
            except ConnectionClosed as e:
                if e.sent or attempt == self.MOST_ATTEMPTS:
                    raise  # it may have run: never repeated
        raise AssertionError("unreachable: the last attempt returns or raises")

    def discover(self) -> Deferred:
        return self._via("discover", rpc="rpc.discover")
