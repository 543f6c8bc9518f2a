"""The ``circles`` twistd plugin: command-line options in, a :class:`CirclesService` out."""

from __future__ import annotations

import os

from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from . import logs
from .config import DEFAULT_PLAIN_PORT, DEFAULT_TLS_PORT, DEFAULT_STATE_DIR, Config
from .embedded_redis import EmbeddedRedisError, find_redis_server
from .redisconn import InvalidRedisURL, parse_redis_url
from .service import CirclesService

REDIS_URL_ENV = "CIRCLES_REDIS_URL"
from . import tls


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise ValueError(f"{text} is not positive")
        return value
    convert.__name__ = kind.__name__
    return convert


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve circles over WebSocket: JSON-RPC 2.0 on /{circle_pk}, secp256k1 authentication, "
        "scripts handed to the circle's workers. Example: "
        "twistd -n circles --auth --tls-cert cert.pem --tls-key key.pem -k <circle_pk>"
    )
    optFlags = [
        ("auth", None, "require authentication before play"),
        ("redis-persist", None, "the private Redis (no --redis-url) keeps its data in --state-dir"),
        ("playground", None, "serve the browser playground at /playground/ (a page to play scripts with a wallet)"),
    ]
    optParameters = [
        logs.LOG_LEVEL_OPTION,
        ("port", "p", None,
         f"TCP port to listen on (default {DEFAULT_PLAIN_PORT}, or {DEFAULT_TLS_PORT} with TLS)", int),
        ("interface", None, "", "address to bind (default: all)"),
        ("tls-cert", None, None, "PEM certificate (chain) file: serve TLS (wss://)"),
        ("tls-key", None, None, "PEM private key file (default: the key is in --tls-cert)"),
        ("nonce-ttl", None, 300.0, "seconds a nonce stays valid", _positive(float)),
        ("max-message-size", None, 1024 * 1024, "largest WebSocket message accepted, in bytes", _positive(int)),
        ("script-timeout", None, 30.0, "seconds a play may take (a play's timeout may only lower it)",
         _positive(float)),
        ("redis-url", None, None,
         "Redis shared with the workers: redis://[user:password@]host:port/db, rediss://..., "
         f"unix:///path?db=N (default: ${REDIS_URL_ENV}, else a private redis-server in --state-dir)"),
        ("redis-prefix", None, "circles:", "prefix of every Redis key (servers and workers must agree)"),
        ("state-dir", None, DEFAULT_STATE_DIR,
         "directory of the private Redis (its socket is STATE_DIR/redis.sock, where circles-worker looks too)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["circles"] = []
        self["listen"] = []

    def opt_circle(self, pubkey: str) -> None:
        """circle to serve, as its public key in hex (repeatable; default: any)"""
        self["circles"].append(pubkey)

    opt_k = opt_circle

    def opt_listen(self, description: str) -> None:
        """Twisted endpoint to listen on, e.g. tcp:8080 or ssl:8443:privateKey=k.pem:certKey=c.pem (repeatable; overrides --port)"""
        self["listen"].append(description)

    def postOptions(self) -> None:
        if self["tls-key"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-key needs --tls-cert")
        # Bad files, keys and a missing redis-server are not usage mistakes: they get one line
        # saying what is wrong (SystemExit), not the help text (UsageError).
        for description in self["listen"]:
            try:
                serverFromString(global_reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--listen {description!r} is not a valid endpoint: {e}")
        redis_url = self["redis-url"] or os.environ.get(REDIS_URL_ENV) or None
        if redis_url is not None:
            try:
                parse_redis_url(redis_url)
            except InvalidRedisURL as e:
                raise usage.UsageError(f"--redis-url: {e}")
        else:
            try:
                find_redis_server()
            except EmbeddedRedisError as e:
                raise SystemExit(f"circles: {e}")
        try:
            tls_options = tls.load(self["tls-cert"], self["tls-key"]) if self["tls-cert"] else None
        except tls.TLSError as e:
            raise SystemExit(f"circles: {e}")
        try:
            self.config = Config(
                circles=self["circles"],
                auth_required=self["auth"],
                listen=tuple(self["listen"]),
                port=self["port"],
                interface=self["interface"],
                tls=tls_options,
                nonce_ttl=self["nonce-ttl"],
                max_message_size=self["max-message-size"],
                script_timeout=self["script-timeout"],
                redis_url=redis_url,
                redis_prefix=self["redis-prefix"],
                state_dir=self["state-dir"],
                redis_persist=self["redis-persist"],
                playground=self["playground"],
            )
        except ValueError as e:
            raise SystemExit(f"circles: -k/--circle: {e}")


def makeService(config: Options, reactor=global_reactor) -> CirclesService:
    logs.set_level(config["log-level"])
    return CirclesService(config.config, reactor=reactor)
