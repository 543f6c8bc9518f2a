"""Where Redis is (a URL) and how to keep a connection to it (txredisapi, reconnecting).

Accepted URLs::

    redis://[[username]:password@]host[:port][/db]
    rediss://[[username]:password@]host[:port][/db][?ssl_ca_certs=/path/ca.pem]
    unix://[[username]:password@]/path/to/redis.sock[?db=N][&password=...]

``rediss://`` verifies the server as every TLS client here does (:mod:`circles.tls_client`):
certificate and host name against the platform's trust store, or against the CA file given as
``ssl_ca_certs`` (a PEM bundle: every certificate in it is trusted), TLS 1.2 at least. The
password never appears in ``repr``/``redacted()``: log those.
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import txredisapi
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS

from circles.tls_client import CAFileError, client_options

DEFAULT_PORT = 6379
CONNECT_TIMEOUT = 5.0


class InvalidRedisURL(ValueError):
    """The URL cannot name a Redis server; ``str()`` says why (never with the password)."""


@attrs.frozen
class RedisAddress:
    """A parsed Redis URL: a TCP host/port (optionally TLS) or a unix socket path."""

    host: Optional[str] = None
    port: int = DEFAULT_PORT
    path: Optional[str] = None  # unix socket
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=lambda p: "None" if p is None else "'***'")
    tls: bool = False
    ca_certs: Optional[str] = None  # PEM CA bundle for rediss://; None: the platform's trust

    def redacted(self) -> str:
        """The URL with any password replaced by ``***``: safe to log."""
        user = self.username or ""
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        if self.path is not None:
            return f"unix://{auth}{self.path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}/{self.db}"

    def endpoint(self, reactor):
        """A Twisted client endpoint reaching this server; :class:`InvalidRedisURL` if the
        ``ssl_ca_certs`` file cannot be used."""
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=CONNECT_TIMEOUT)
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        if not self.tls:
            return endpoint
        try:
            options = client_options(self.host, self.ca_certs)
        except CAFileError as e:
            raise InvalidRedisURL(f"ssl_ca_certs: {e}") from None
        return wrapClientTLS(options, endpoint)


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
        raise InvalidRedisURL(f"unsupported scheme {parts.scheme!r}: use redis://, rediss:// or unix://")
    if not parts.hostname:
        raise InvalidRedisURL("no host in the URL")
    db_text = parts.path.lstrip("/") or query.get("db", "0")
    tls = parts.scheme == "rediss"
    if "ssl_ca_certs" in query and not tls:
        raise InvalidRedisURL("ssl_ca_certs needs a rediss:// URL")
    return RedisAddress(host=parts.hostname, port=port or DEFAULT_PORT, db=_db(db_text), username=username,
                        password=password, tls=tls, ca_certs=query.get("ssl_ca_certs"))


def redact_url(url: Optional[str]) -> Optional[str]:
    """``url`` safe to log: parsed and redacted, or a placeholder if it does not parse."""
    if url is None:
        return None
    try:
        return parse_redis_url(url).redacted()
    except InvalidRedisURL:
        return "<invalid redis url>"


def connect(address: RedisAddress, reactor, *, poolsize: int = 1,
            reply_timeout: Optional[float] = None) -> txredisapi.RedisFactory:
    """Start a txredisapi pool of ``poolsize`` connections that reconnects on its own.

    The factory is returned at once (it is "lazy"): ``factory.size`` says how many connections
    are up, ``factory.handler`` issues commands, ``factory.disconnect()`` stops it. Values come
    back as text (never converted to numbers: a script's output "42" stays a string).
    """
    factory = txredisapi.RedisFactory(
        address.redacted(), address.db or None, poolsize, isLazy=True, charset="utf-8",
        password=address.password, replyTimeout=reply_timeout, convertNumbers=False,
        username=address.username,
    )
    # Reconnect quickly: a restarted Redis should be used again within a couple of seconds.
    factory.initialDelay = 0.1
    factory.maxDelay = 2.0
    factory.startConnecting(address.endpoint(reactor))
    return factory


def text(value) -> str:
    """A value read from Redis as text (txredisapi leaves undecodable bytes as bytes)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
