"""Connections to Redis: a txredisapi pool that reconnects on its own (:func:`connect`), to the
server a :class:`~circles.backend.redis_url.RedisAddress` names or to the primary its Sentinels
name (:mod:`circles.backend.sentinel`), watched for what the operator should hear
(:mod:`circles.backend.reachability`)."""

from __future__ import annotations

from collections.abc import Callable

import txredisapi

from circles.backend import txredisapi_patches  # noqa: F401  (replaces txredisapi's logging on import)
from circles.backend.reachability import Reachability, Watched
from circles.backend.redis_url import RedisAddress, host_port
from circles.backend.sentinel import SENTINEL_TIMEOUT, PrimaryEndpoint, PrimaryFactory, PrimarySubscriber, Sentinels
from circles.backend.txredisapi_patches import EagerProtocol, Subscriber


def connect(address: RedisAddress, reactor, *, poolsize: int = 1, reply_timeout: float | None = None,
            watch: Reachability | None = None,
            on_message: Callable[[str | None, str, str], None] | None = None) -> txredisapi.RedisFactory:
    """Start a txredisapi pool of ``poolsize`` connections that reconnects on its own.

    The factory is returned at once (it is "lazy"): ``factory.size`` says how many connections
    are up, ``factory.handler`` issues commands, ``factory.disconnect()`` stops it. Values come
    back as text (never converted to numbers: a script's output "42" stays a string). ``watch``
    hears of every attempt, and tells the operator what matters (:class:`~circles.backend.reachability.Reachability`);
    retrying is logged at debug only. For a ``redis+sentinel://`` address every attempt asks
    the Sentinels where the primary is, and a node that does not say it is the primary is
    dropped before any command is sent to it: a failover is followed without a restart.
    ``on_message``: the connections subscribe (``PSUBSCRIBE``), and each message is handed to it
    as ``(pattern, channel, message)``.
    """
    if address.sentinels:
        assert address.master is not None  # a redis+sentinel:// URL names its primary
        sentinels = Sentinels(address.master, [
            connect(RedisAddress(host=host, port=port, password=address.sentinel_password), reactor,
                    reply_timeout=SENTINEL_TIMEOUT)
            for host, port in address.sentinels], reactor)
        factory = PrimaryFactory(sentinels, address.where(), address.db or None, poolsize,
                                 isLazy=True, charset="utf-8", password=address.password,
                                 replyTimeout=reply_timeout, convertNumbers=False, username=address.username)
        endpoint = PrimaryEndpoint(factory, reactor)
        # Asking the Sentinels is cheap, and a failover takes seconds: every half second at least.
        factory.maxDelay = 0.5
    else:
        factory = txredisapi.RedisFactory(
            address.redacted(), address.db or None, poolsize, isLazy=True, charset="utf-8",
            password=address.password, replyTimeout=reply_timeout, convertNumbers=False,
            username=address.username,
        )
        factory.protocol = EagerProtocol
        endpoint = address.endpoint(reactor)
        factory.maxDelay = 2.0
    factory.clock = reactor  # the reply timeouts' (EagerProtocol)
    if on_message is not None:
        factory.protocol = PrimarySubscriber if address.sentinels else Subscriber
        factory.on_message = on_message
    # Reconnect quickly: a restarted Redis should be used again within a couple of seconds.
    factory.initialDelay = 0.1
    if watch is not None:
        # Fails only when Redis refuses us (password, database): txredisapi stops trying then.
        factory.deferred.addErrback(watch.refused)
    factory.startConnecting(Watched(endpoint, address, watch))
    return factory


def reached(address: RedisAddress, factory) -> str:
    """Where ``factory`` (from :func:`connect`) is connected, for messages:
    ``redis://host:6379/0``, or ``redis+sentinel://.../mymaster/0 (primary 10.0.0.7:6379)``."""
    primary = getattr(factory, "primary", None)
    return address.where() if primary is None else f"{address.where()} (primary {host_port(*primary)})"
