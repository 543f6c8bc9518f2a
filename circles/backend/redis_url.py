"""Where Redis is: a Redis URL parsed into a :class:`RedisAddress`, and the endpoint reaching it.

Accepted URLs::

    redis://[[username]:password@]host[:port][/db]
    rediss://[[username]:password@]host[:port][/db][?ssl_ca_certs=/path/ca.pem]
    unix://[[username]:password@]/path/to/redis.sock[?db=N][&password=...]
    redis+sentinel://[[username]:password@]host[:port],host[:port],.../MASTER_NAME[/db][?sentinel_password=...]

``redis+sentinel://`` names a replicated Redis through its Sentinels (port 26379 unless given):
the primary of ``MASTER_NAME`` is asked of them before every connection, and a connection is
used only once the node it reaches says it is that primary (:func:`circles.backend.redis.connect`).
The credentials are the data nodes'; ``sentinel_password`` is for Sentinels that have one.
``rediss://`` verifies the server as every TLS client here does (:mod:`circles.common.tls_client`):
certificate and host name against the platform's trust store, or against the CA file given as
``ssl_ca_certs`` (a PEM bundle: every certificate in it is trusted), TLS 1.2 at least. The
password never appears in ``repr``/``redacted()``: log those.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS

from circles.common.tls_client import CAFileError, client_options

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_SCHEME = "redis+sentinel"
#: Seconds a connection to Redis (or a Sentinel) may take to be made.
CONNECT_TIMEOUT = 5.0


class InvalidRedisURL(ValueError):
    """The URL cannot name a Redis server; ``str()`` says why (never with the password)."""


@attrs.frozen
class RedisAddress:
    """A parsed Redis URL: a TCP host/port (optionally TLS), a unix socket path, or the
    Sentinels that know the primary of ``master``."""

    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=lambda p: "None" if p is None else "'***'")
    tls: bool = False
    ca_certs: str | None = None  # PEM CA bundle for rediss://; None: the platform's trust
    sentinels: tuple[tuple[str, int], ...] = ()  # (host, port) of each Sentinel, for redis+sentinel://
    master: str | None = None  # the name the Sentinels know the primary by
    sentinel_password: str | None = attrs.field(default=None, repr=lambda p: "None" if p is None else "'***'")

    def redacted(self) -> str:
        """The URL with any password replaced by ``***``: safe to log."""
        user = self.username or ""
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        if self.path is not None:
            return f"unix://{auth}{self.path}?db={self.db}"
        if self.sentinels:
            return f"{SENTINEL_SCHEME}://{auth}{self._sentinel_hosts()}/{self.master}/{self.db}" + \
                ("?sentinel_password=***" if self.sentinel_password is not None else "")
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host_port(self.host, self.port)}/{self.db}"  # type: ignore[arg-type]  # neither a socket nor Sentinels: a host

    def where(self) -> str:
        """The URL without its credentials, for messages: ``unix:///path/redis.sock``,
        ``redis://host:6379/0``, ``redis+sentinel://h1:26379,h2:26379/mymaster/0``."""
        if self.path is not None:
            return f"unix://{self.path}" + (f"?db={self.db}" if self.db else "")
        if self.sentinels:
            return f"{SENTINEL_SCHEME}://{self._sentinel_hosts()}/{self.master}/{self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{host_port(self.host, self.port)}/{self.db}"  # type: ignore[arg-type]  # a host

    def _sentinel_hosts(self) -> str:
        return ",".join(host_port(host, port) for host, port in self.sentinels)

    def endpoint(self, reactor):
        """A Twisted client endpoint reaching this server; :class:`InvalidRedisURL` if the
        ``ssl_ca_certs`` file cannot be used. Not for a ``redis+sentinel://`` address, whose
        server changes (:func:`circles.backend.redis.connect` asks the Sentinels)."""
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


def host_port(host: str, port: int) -> str:
    """``host:port``, the host in brackets if it is an IPv6 address."""
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


def redact_url(url: str | None) -> str | None:
    """``url`` safe to log: parsed and redacted, or a placeholder if it does not parse."""
    if url is None:
        return None
    try:
        return parse_redis_url(url).redacted()
    except InvalidRedisURL:
        return "<invalid redis url>"
