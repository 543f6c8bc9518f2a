"""Where Redis is (a URL) and how to keep a connection to it (txredisapi, reconnecting).

Accepted URLs::

    redis://[[username]:password@]host[:port][/db]
    rediss://[[username]:password@]host[:port][/db][?ssl_ca_certs=/path/ca.pem]
    unix://[[username]:password@]/path/to/redis.sock[?db=N][&password=...]
    redis+sentinel://[[username]:password@]host[:port],host[:port],.../MASTER_NAME[/db][?sentinel_password=...]

``redis+sentinel://`` names a replicated Redis through its Sentinels (port 26379 unless given):
the primary of ``MASTER_NAME`` is asked of them before every connection, and a connection is
used only once the node it reaches says it is that primary (:func:`connect`).
The credentials are the data nodes'; ``sentinel_password`` is for Sentinels that have one.
``rediss://`` verifies the server as every TLS client here does (:mod:`circles.common.tls_client`):
certificate and host name against the platform's trust store, or against the CA file given as
``ssl_ca_certs`` (a PEM bundle: every certificate in it is trusted), TLS 1.2 at least. The
password never appears in ``repr``/``redacted()``: log those.
"""

from __future__ import annotations

import os
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import txredisapi
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, FailureGroup, ensureDeferred, race
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.common.logs import Logger
from circles.common.tls_client import CAFileError, client_options

log = Logger()

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_SCHEME = "redis+sentinel"
CONNECT_TIMEOUT = 5.0


class InvalidRedisURL(ValueError):
    """The URL cannot name a Redis server; ``str()`` says why (never with the password)."""


@attrs.frozen
class RedisAddress:
    """A parsed Redis URL: a TCP host/port (optionally TLS), a unix socket path, or the
    Sentinels that know the primary of ``master``."""

    host: Optional[str] = None
    port: int = DEFAULT_PORT
    path: Optional[str] = None  # unix socket
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=lambda p: "None" if p is None else "'***'")
    tls: bool = False
    ca_certs: Optional[str] = None  # PEM CA bundle for rediss://; None: the platform's trust
    sentinels: "tuple[tuple[str, int], ...]" = ()  # (host, port) of each Sentinel, for redis+sentinel://
    master: Optional[str] = None  # the name the Sentinels know the primary by
    sentinel_password: Optional[str] = attrs.field(default=None, repr=lambda p: "None" if p is None else "'***'")

    def redacted(self) -> str:
        """The URL with any password replaced by ``***``: safe to log."""
        user = self.username or ""
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        if self.path is not None:
            return f"unix://{auth}{self.path}?db={self.db}"
        if self.sentinels:
            return f"{SENTINEL_SCHEME}://{auth}{self._sentinel_hosts()}/{self.master}/{self.db}" + \
                ("?sentinel_password=***" if self.sentinel_password is not None else "")
        return f"{'rediss' if self.tls else 'redis'}://{auth}{_host_port(self.host, self.port)}/{self.db}"  # type: ignore[arg-type]

    def where(self) -> str:
        """The URL without its credentials, for messages: ``unix:///path/redis.sock``,
        ``redis://host:6379/0``, ``redis+sentinel://h1:26379,h2:26379/mymaster/0``."""
        if self.path is not None:
            return f"unix://{self.path}" + (f"?db={self.db}" if self.db else "")
        if self.sentinels:
            return f"{SENTINEL_SCHEME}://{self._sentinel_hosts()}/{self.master}/{self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{_host_port(self.host, self.port)}/{self.db}"  # type: ignore[arg-type]

    def _sentinel_hosts(self) -> str:
        return ",".join(_host_port(host, port) for host, port in self.sentinels)

    def endpoint(self, reactor):
        """A Twisted client endpoint reaching this server; :class:`InvalidRedisURL` if the
        ``ssl_ca_certs`` file cannot be used. Not for a ``redis+sentinel://`` address, whose
        server changes (:func:`connect` asks the Sentinels)."""
        if self.sentinels:
            raise ValueError("a redis+sentinel:// address names no one server")
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=CONNECT_TIMEOUT)
        assert self.host is not None  # neither a socket nor Sentinels: a host
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        if not self.tls:
            return endpoint
        try:
            options = client_options(self.host, self.ca_certs)
        except CAFileError as e:
            raise InvalidRedisURL(f"ssl_ca_certs: {e}") from None
        return wrapClientTLS(options, endpoint)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _db(text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise InvalidRedisURL(f"database must be a number, not {text!r}") from None
    if db < 0:
        raise InvalidRedisURL("database must not be negative")
    return db


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``url`` (see the module docstring); :class:`InvalidRedisURL` if it is not one."""
    if url.partition("://")[0].lower() == SENTINEL_SCHEME:
        return _parse_sentinel_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidRedisURL(f"not a Redis URL: {e}") from None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else query.get("password")
    unknown = query.keys() - {"db", "password", "ssl_ca_certs"}
    if unknown:
        raise InvalidRedisURL(f"unknown URL parameter(s): {', '.join(sorted(unknown))}")
    if parts.scheme == "unix":
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidRedisURL("unix:// URLs need an absolute socket path: unix:///path/to/redis.sock")
        return RedisAddress(path=path, db=_db(query.get("db", "0")), username=username, password=password)
    if parts.scheme not in ("redis", "rediss"):
        raise InvalidRedisURL(f"unsupported scheme {parts.scheme!r}: use redis://, rediss://, unix:// or "
                              f"{SENTINEL_SCHEME}://")
    if not parts.hostname:
        raise InvalidRedisURL("no host in the URL")
    db_text = parts.path.lstrip("/") or query.get("db", "0")
    tls = parts.scheme == "rediss"
    if "ssl_ca_certs" in query and not tls:
        raise InvalidRedisURL("ssl_ca_certs needs a rediss:// URL")
    return RedisAddress(host=parts.hostname, port=port or DEFAULT_PORT, db=_db(db_text), username=username,
                        password=password, tls=tls, ca_certs=query.get("ssl_ca_certs"))


def _parse_sentinel_url(url: str) -> RedisAddress:
    """``redis+sentinel://[[user]:password@]host[:port],.../MASTER[/db][?sentinel_password=...]``:
    several hosts in one authority, which ``urlsplit`` does not take apart."""
    rest = url.split("://", 1)[1]
    rest, _, query_text = rest.partition("?")
    authority, _, path = rest.partition("/")
    query = {k: v[-1] for k, v in parse_qs(query_text).items()}
    unknown = query.keys() - {"password", "sentinel_password"}
    if unknown:
        raise InvalidRedisURL(f"unknown URL parameter(s): {', '.join(sorted(unknown))}")
    credentials, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    password = password if password is not None else query.get("password")
    sentinels = []
    for item in hosts.split(","):
        try:
            parts = urlsplit(f"//{item}")
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise InvalidRedisURL(f"not a Sentinel address {item!r}: {e}") from None
        if not host:
            raise InvalidRedisURL(f"{SENTINEL_SCHEME}:// URLs need host[:port] of each Sentinel, "
                                  f"separated by commas: {item!r} is not one")
        sentinels.append((host, port or DEFAULT_SENTINEL_PORT))
    segments = [unquote(segment) for segment in path.split("/")] if path else []
    if not segments or not segments[0]:
        raise InvalidRedisURL(f"no master name: {SENTINEL_SCHEME}://host:port,.../MASTER_NAME/DB")
    if len(segments) > 2:
        raise InvalidRedisURL(f"too many path segments: {SENTINEL_SCHEME}://host:port,.../MASTER_NAME/DB")
    db = _db(segments[1]) if len(segments) == 2 and segments[1] else 0
    return RedisAddress(sentinels=tuple(sentinels), master=segments[0], db=db, username=username,
                        password=password, sentinel_password=query.get("sentinel_password"))


def redact_url(url: Optional[str]) -> Optional[str]:
    """``url`` safe to log: parsed and redacted, or a placeholder if it does not parse."""
    if url is None:
        return None
    try:
        return parse_redis_url(url).redacted()
    except InvalidRedisURL:
        return "<invalid redis url>"


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
class _Watched:
    """An endpoint that reports each attempt to a :class:`Reachability` and reads as its URL
    (Twisted's retry messages name the endpoint)."""

    def __init__(self, endpoint, address: RedisAddress, watch: Optional[Reachability]) -> None:
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


class _QuietLogger(Logger):
    """Twisted's reconnection messages ("Scheduling retry 5 to connect ... in 2.1 seconds"),
    one per attempt per connection, at debug instead of info."""

    def emit(self, level: LogLevel, format=None, **kwargs) -> None:
        super().emit(LogLevel.debug if level == LogLevel.info else level, format, **kwargs)


class _QuietClientService(ClientService):
    _log = _QuietLogger()


class _TxredisapiLog:
    """What txredisapi finds as ``log``: its few messages ("Discarding dead connection.", "Redis
    error: could not auth: ...", which :class:`Reachability` says better) at debug, not at info
    as Twisted's legacy ``log.msg`` writes them."""

    def msg(self, *message, **kwargs) -> None:
        _txredisapi_log.debug("{message}", message=" ".join(str(part) for part in message))


_txredisapi_log = Logger(namespace="txredisapi")


# txredisapi names these at call time: each pooled connection's ClientService (ours is the same
# but for its log level), and its log.
txredisapi.ClientService = _QuietClientService
txredisapi.log = _TxredisapiLog()


def connect(address: RedisAddress, reactor, *, poolsize: int = 1, reply_timeout: Optional[float] = None,
            watch: Optional[Reachability] = None) -> txredisapi.RedisFactory:
    """Start a txredisapi pool of ``poolsize`` connections that reconnects on its own.

    The factory is returned at once (it is "lazy"): ``factory.size`` says how many connections
    are up, ``factory.handler`` issues commands, ``factory.disconnect()`` stops it. Values come
    back as text (never converted to numbers: a script's output "42" stays a string). ``watch``
    hears of every attempt, and tells the operator what matters (:class:`Reachability`);
    retrying is logged at debug only. For a ``redis+sentinel://`` address every attempt asks
    the Sentinels where the primary is, and a node that does not say it is the primary is
    dropped before any command is sent to it: a failover is followed without a restart.
    """
    if address.sentinels:
        factory = _PrimaryFactory(Sentinels(address, reactor), address.where(), address.db or None, poolsize,
                                  isLazy=True, charset="utf-8", password=address.password,
                                  replyTimeout=reply_timeout, convertNumbers=False, username=address.username)
        endpoint = _PrimaryEndpoint(factory, reactor)
        # Asking the Sentinels is cheap, and a failover takes seconds: every half second at least.
        factory.maxDelay = 0.5
    else:
        factory = txredisapi.RedisFactory(
            address.redacted(), address.db or None, poolsize, isLazy=True, charset="utf-8",
            password=address.password, replyTimeout=reply_timeout, convertNumbers=False,
            username=address.username,
        )
        endpoint = address.endpoint(reactor)
        factory.maxDelay = 2.0
    # Reconnect quickly: a restarted Redis should be used again within a couple of seconds.
    factory.initialDelay = 0.1
    if watch is not None:
        # Fails only when Redis refuses us (password, database): txredisapi stops trying then.
        factory.deferred.addErrback(watch.refused)
    factory.startConnecting(_Watched(endpoint, address, watch))
    return factory


def reached(address: RedisAddress, factory) -> str:
    """Where ``factory`` (from :func:`connect`) is connected, for messages:
    ``redis://host:6379/0``, or ``redis+sentinel://.../mymaster/0 (primary 10.0.0.7:6379)``."""
    primary = getattr(factory, "primary", None)
    return address.where() if primary is None else f"{address.where()} (primary {_host_port(*primary)})"


# -- Sentinel ---------------------------------------------------------------------------------

#: Seconds a Sentinel may take to answer where the primary is.
SENTINEL_TIMEOUT = 1.0


class NoPrimary(txredisapi.ConnectionError):
    """No Sentinel could name a primary that is up (during a failover, or none reachable)."""


class Sentinels:
    """Connections to the Sentinels of a ``redis+sentinel://`` address, kept up, to ask them
    where the primary is. Only connected Sentinels are asked, so a dead one costs nothing."""

    def __init__(self, address: RedisAddress, reactor) -> None:
        self.master = address.master
        self.clock = reactor
        self.connections = [connect(RedisAddress(host=host, port=port, password=address.sentinel_password),
                                    reactor, reply_timeout=SENTINEL_TIMEOUT)
                            for host, port in address.sentinels]

    async def primary(self) -> "tuple[str, int]":
        """``(host, port)`` of the primary, as the first Sentinel to answer names it, provided
        it believes that primary up (not ``s_down``/``o_down``): the client side of Redis's
        Sentinel client guidelines, with the role checked once connected."""
        waited = 0.0
        while not any(c.size for c in self.connections):
            if waited >= CONNECT_TIMEOUT:
                raise NoPrimary(f"no Sentinel of {self.master} answers")
            await deferLater(self.clock, 0.05, lambda: None)  # just started: give them a moment
            waited += 0.05
        named = [ensureDeferred(self._named(c.handler.execute_command("SENTINEL", "MASTER", self.master)))
                 for c in self.connections if c.size]
        try:
            _, primary = await race(named)
        except FailureGroup as e:
            if any(f.check(CancelledError) for f in e.failures):
                raise CancelledError() from None  # this call was cancelled: race cancelled every answer
            raise NoPrimary(f"no Sentinel knows a primary of {self.master} that is up") from None
        return primary

    @staticmethod
    async def _named(command: Deferred) -> "tuple[str, int]":
        """The primary a Sentinel's answer (``SENTINEL MASTER``) names, if it believes it up; else
        :class:`NoPrimary`. Cancelled once another Sentinel answered first; the command itself never
        is (txredisapi matches replies to commands in order)."""
        reply = await _reply_or_none(command)
        state = dict(zip(reply[0::2], reply[1::2])) if isinstance(reply, list) else {}
        flags = set(text(state.get("flags")).split(","))
        if "master" in flags and not flags & {"s_down", "o_down", "disconnected"}:
            return text(state["ip"]), int(text(state["port"]))
        raise NoPrimary("this Sentinel names no primary that is up")

    def disconnect(self) -> Deferred:
        return DeferredList([c.disconnect() for c in self.connections], consumeErrors=True)


def _reply_or_none(command: Deferred) -> Deferred:
    """``command``'s reply, or None if it failed, through a Deferred of its own: cancelling that
    one leaves the command be (its reply, when it comes, is dropped)."""
    reply: Deferred = Deferred()
    command.addCallbacks(reply.callback, lambda _: reply.callback(None))
    return reply


class _PrimaryProtocol(txredisapi.RedisProtocol):
    """A connection that asks ``ROLE`` before it is used, and is closed unless the node says it
    is the primary: nothing is ever sent to a replica.

    Only then does RedisProtocol's own start make it ready (and the pool take it), and only if
    it is still connected: a connection lost meanwhile must not join the pool, where it would
    count as up and swallow commands until each timed out. (txredisapi's SentinelRedisProtocol
    makes it ready whatever happened, and leaves a refused password as an unhandled error.)"""
    password: Optional[str]  # RedisProtocol's


    def connectionMade(self) -> Deferred:
        return ensureDeferred(self._check_role())

    async def _check_role(self) -> None:
        password = self.password
        if password is not None:
            try:
                await self.auth(password, self.username)
            except txredisapi.ResponseError:
                # Refused credentials: RedisProtocol's own start says so (and stops trying).
                return await super().connectionMade()
            except Exception:
                self.transport.loseConnection()  # lost, or timed out: the next attempt will tell
                return None
        try:
            role = await self.role()
        except Exception:
            role = None  # lost, timed out, or not ready (LOADING): not usable now
        if not self.connected or not role or text(role[0]) != "master":
            self.transport.loseConnection()
            return None
        self.password = None  # authenticated already: RedisProtocol's start need not do it again
        try:
            return await super().connectionMade()
        finally:
            self.password = password


class _PrimaryFactory(txredisapi.RedisFactory):
    """A pool whose every new connection checks ``ROLE`` before it is used (:class:`_PrimaryProtocol`)."""

    protocol = _PrimaryProtocol

    def __init__(self, sentinels: Sentinels, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sentinels = sentinels
        self.primary: "Optional[tuple[str, int]]" = None  # where the last attempt went

    def retryDelay(self, attempt: int) -> float:
        # The first retry at once: the primary is asked anew, and a new one is the likely
        # reason the connection was lost.
        return 0.0 if attempt <= 1 else super().retryDelay(attempt)

    def disconnect(self) -> Deferred:
        d = super().disconnect()
        return DeferredList([d, self.sentinels.disconnect()], consumeErrors=True)


@implementer(IStreamClientEndpoint)
class _PrimaryEndpoint:
    """Connects to wherever the Sentinels say the primary is now."""

    def __init__(self, factory: _PrimaryFactory, reactor) -> None:
        self._factory = factory
        self._reactor = reactor

    def connect(self, protocol_factory) -> Deferred:
        return ensureDeferred(self._connect(protocol_factory))

    async def _connect(self, protocol_factory):
        primary = await self._factory.sentinels.primary()
        if self._factory.primary not in (None, primary):
            # A failover: what is still connected reaches the old primary.
            for connection in list(self._factory.pool):
                connection.transport.loseConnection()
        self._factory.primary = primary
        return await HostnameEndpoint(self._reactor, *primary, timeout=CONNECT_TIMEOUT).connect(protocol_factory)


def text(value) -> str:
    """A value read from Redis as text (txredisapi leaves undecodable bytes as bytes)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
