"""Where circles changes txredisapi or leans on its internals: in this module only.

pyproject.toml pins the txredisapi line this was written against (1.6), and
``tests/integration/test_dependencies.py`` checks each assumption below, with the source digests of the
txredisapi code relied on: a txredisapi that changes any of it fails there, not in production.

What is replaced, when this module is imported (:mod:`circles.backend.redis` imports it before
any connection is made). txredisapi names both at call time:

- ``txredisapi.ClientService``: each pooled connection's reconnecting service (``_PoolSlot``
  builds one per connection). Ours is Twisted's own with its reconnection messages ("Scheduling
  retry 5 to connect ... in 2.1 seconds", one per attempt per connection) at debug, through the
  class attribute ``ClientService._log``, private to Twisted: there is no public way to quiet it.
- ``txredisapi.log``: the module's legacy ``log.msg`` lines ("Discarding dead connection.",
  "Redis error: could not auth: ...", which :class:`~circles.backend.reachability.Reachability`
  says better), at debug in our own namespace rather than at info.
- ``BaseRedisProtocol._build_command``: every command's bytes, built by :func:`build_command`,
  byte for byte what txredisapi's builds: by hiredis's ``pack_command`` (C) for bytes, text and
  integers over UTF-8, else in one pass of Python. Its own calls a method three times per
  argument and copies the command twice: on a play's ENQUEUE (some thirty arguments) it was a
  fifth of the server's CPU.
- ``BaseRedisProtocol.tryConvertData``: every reply's values, by :func:`convert_reply`, to what
  txredisapi's gives, faster where circles' connections are (``convertNumbers=False``, a
  charset): its own calls a method per value with three type checks each, some 30 values for a
  task a worker takes, a fifth of the worker's own CPU per task.
- ``RedisProtocol.execute_command``'s reply timeout, on our connections (:class:`EagerProtocol`):
  a timer in a lane instead of a ``DelayedCall`` each; what it does when it fires is txredisapi's
  ``fire_timeout``, copied.
- ``BaseRedisProtocol.eval``: txredisapi's, with each script's bytes and SHA-1 digest made once
  (:func:`script_digest`) rather than at every call: encoding and hashing the few kilobytes of
  a step's Lua was 1.5% of the instructions a worker spends on a play (``bench/instructions.py``).
  It relies on txredisapi's ``script_hashes``, ``evalsha``, ``_evalsha_failed`` and ``_eval``.

What is relied on:

- ``RedisProtocol.connectionMade`` authenticates with ``self.password`` unless it is None, then
  selects the database, then makes the connection ready (the pool takes it then):
  :class:`CheckedProtocol` authenticates first itself, checks the connection, and lets it run
  with the password set aside.
- ``RedisFactory.buildProtocol`` sets each protocol's ``factory`` (:class:`Subscriber` reaches
  its factory's ``on_message`` through it), and ``SubscriberProtocol.replyReceived`` hands
  ``pmessage`` replies to ``messageReceived`` and others (PING's) to the command waiting.
- ``RedisFactory.pool``: the connections up now, each with ``connected`` (0 once lost) and its
  ``transport`` (:func:`live_connection`, :func:`drop_connections`).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import hiredis
import txredisapi
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import LogLevel

from circles.common.eager import send_eagerly_on
from circles.common.logs import Logger
from circles.common.timers import TimerLane


class QuietLogger(Logger):
    """Twisted's reconnection messages, one per attempt per connection, at debug instead of info."""

    def emit(self, level: LogLevel, format=None, **kwargs) -> None:
        super().emit(LogLevel.debug if level == LogLevel.info else level, format, **kwargs)


class QuietClientService(ClientService):
    """Twisted's ``ClientService``, its messages through :class:`QuietLogger`."""

    _log = QuietLogger()


class _TxredisapiLog:
    """What txredisapi finds as ``log``: its few messages at debug, not at info as Twisted's
    legacy ``log.msg`` writes them."""

    def msg(self, *message, **kwargs) -> None:
        _txredisapi_log.debug("{message}", message=" ".join(str(part) for part in message))


_txredisapi_log = Logger(namespace="txredisapi")

txredisapi.ClientService = QuietClientService
txredisapi.log = _TxredisapiLog()


#: What hiredis's ``pack_command`` (C) encodes as txredisapi does, with UTF-8 text: a float it
#: writes as ``repr`` does, not as txredisapi's ``format(value, "f")``, and a bool it refuses.
_PACKED_AS_TXREDISAPI = frozenset({bytes, str, int})


def build_command(self: txredisapi.BaseRedisProtocol, *args: Any, **kwargs: Any) -> bytes:
    """A command in Redis's protocol (an array of bulk strings), as txredisapi's
    ``_build_command`` makes it: text in the connection's charset, other values through its
    ``_encode_value`` (which also raises its errors). Bytes, text and integers over a strict
    UTF-8 connection (ours) are packed by hiredis in C: a play's ENQUEUE has some 34 arguments."""
    if self.charset == "utf-8" and self.errors == "strict" and set(map(type, args)) <= _PACKED_AS_TXREDISAPI:
        try:
            return hiredis.pack_command(args)
        except UnicodeEncodeError:
            pass  # (a lone surrogate) txredisapi's error, below
    parts = [b"*%d\r\n" % len(args)]
    charset, errors = self.charset, self.errors
    for arg in args:
        if type(arg) is bytes:
            data = arg
        elif type(arg) is str and charset is not None:
            try:
                data = arg.encode(charset, errors)
            except UnicodeEncodeError:
                data = self._encode_value(arg)
        elif type(arg) is int:
            data = b"%d" % arg
        else:
            data = self._encode_value(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


#: txredisapi's own, kept for the tests that hold the two to the same bytes.
txredisapis_build_command = txredisapi.BaseRedisProtocol._build_command
txredisapi.BaseRedisProtocol._build_command = build_command


def convert_reply(self: txredisapi.BaseRedisProtocol, data: Any) -> Any:
    """A reply as txredisapi's ``tryConvertData`` makes it: lists converted item by item, bytes
    decoded in the connection's charset where they can be (left bytes where they cannot), other
    values as they are. Numbers are txredisapi's to convert (``convertNumbers``): then its own."""
    charset = self.charset
    if self.convertNumbers or charset is None:
        return txredisapis_try_convert_data(self, data)
    kind = data.__class__
    if kind is bytes:
        try:
            return data.decode(charset)
        except UnicodeDecodeError:
            return data
    if kind is not list:
        return txredisapis_try_convert_data(self, data)
    converted = []
    for item in data:
        kind = item.__class__
        if kind is bytes:
            try:
                item = item.decode(charset)
            except UnicodeDecodeError:
                pass
        elif kind is list:
            item = convert_reply(self, item)
        elif kind is not str and kind is not int:
            item = txredisapis_try_convert_data(self, item)
        converted.append(item)
    return converted


#: txredisapi's own, kept for the tests that hold the two to the same values.
txredisapis_try_convert_data = txredisapi.BaseRedisProtocol.tryConvertData
txredisapi.BaseRedisProtocol.tryConvertData = convert_reply


@lru_cache(maxsize=64)
def script_digest(script: str | bytes) -> tuple[bytes, str]:
    """A Lua script's bytes (UTF-8) and the SHA-1 that EVALSHA names it by, in hex: made once a
    script (circles' steps are a dozen constants; the cache's bound keeps a caller with scripts
    of its own from growing it)."""
    data = script.encode() if isinstance(script, str) else script
    return data, hashlib.sha1(data).hexdigest()


def eval_script(self: txredisapi.BaseRedisProtocol, script: str | bytes | bytearray, keys: Any = (),
                args: Any = ()) -> Deferred:
    """txredisapi's ``eval`` (EVALSHA once Redis has the script, EVAL to load it, EVAL again
    after a NOSCRIPT), the script's bytes and digest from :func:`script_digest`."""
    data, digest = script_digest(script if isinstance(script, (str, bytes)) else bytes(script))
    if digest in self.script_hashes:
        return self.evalsha(digest, keys, args).addErrback(self._evalsha_failed, data, digest, keys, args)
    return self._eval(data, digest, keys, args)


#: txredisapi's own, kept for the test that holds it to the one reviewed.
txredisapis_eval = txredisapi.BaseRedisProtocol.eval
txredisapi.BaseRedisProtocol.eval = eval_script


class EagerProtocol(txredisapi.RedisProtocol):
    """txredisapi's connection, whose commands are sent at once when nothing is queued
    (:mod:`circles.common.eager`), not on the reactor's next turn after two ``epoll_ctl``.

    Its reply timeouts are entries of one :class:`~circles.common.timers.TimerLane` on the
    factory's ``clock`` (:func:`circles.backend.redis.connect` sets it), where txredisapi makes
    a ``DelayedCall`` for every command and cancels it at the reply (with the lanes' kept calls,
    3.1% fewer instructions a play when plays come one at a time: docs/benchmarks.md, "Unbatched
    plays").
    What a timeout does is txredisapi's (:meth:`_reply_timed_out`)."""

    _reply_timeouts: TimerLane | None = None

    def connectionMade(self) -> Deferred:
        send_eagerly_on(self.transport)
        clock = getattr(self.factory, "clock", None)
        if self.replyTimeout and clock is not None:
            self._reply_timeouts = TimerLane(clock, self.replyTimeout, self._reply_timed_out)
        return super().connectionMade()

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred:
        lane = self._reply_timeouts
        if lane is None or not kwargs.get("apply_timeout", True):
            return super().execute_command(*args, **kwargs)
        kwargs["apply_timeout"] = False
        result = super().execute_command(*args, **kwargs)
        lane.set(result)
        return result.addBoth(_answered, lane, result)

    def _reply_timed_out(self, result: Deferred) -> None:
        # txredisapi's fire_timeout: the command fails, so does every one waiting, and the
        # connection is dropped (a reply still to come would be taken for the next command's).
        if result.called:
            return  # answered; a callback of its own still running
        error = f"Not received Redis response in {self.replyTimeout} seconds"
        result.errback(txredisapi.TimeoutError(error))
        while self.replyQueue.waiting:
            self.replyQueue.put(txredisapi.TimeoutError(error))
        self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)  # fails the commands waiting: their timeouts go with them
        lane = self._reply_timeouts
        if lane is not None and not lane:
            lane.stop()


def _answered(value: Any, lane: TimerLane, result: Deferred) -> Any:
    lane.cancel(result)
    return value


class CheckedProtocol(EagerProtocol):
    """A connection checked (:meth:`usable`) before it is used, and closed unless it passes.

    Only then does RedisProtocol's own start make it ready (and the pool take it), and only if
    it is still connected: a connection lost meanwhile must not join the pool, where it would
    count as up and swallow commands until each timed out."""

    password: str | None  # RedisProtocol's

    async def usable(self) -> bool:
        """Whether this connection may be used (it is authenticated already)."""
        raise NotImplementedError

    def connectionMade(self) -> Deferred:
        send_eagerly_on(self.transport)  # AUTH and the check too
        return ensureDeferred(self._check())

    async def _check(self) -> None:
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
            usable = await self.usable()
        except Exception:
            usable = False  # lost, timed out, or not ready (LOADING): not usable now
        if not self.connected or not usable:
            self.transport.loseConnection()
            return None
        self.password = None  # authenticated already: RedisProtocol's start need not do it again
        try:
            return await super().connectionMade()
        finally:
            self.password = password


class Subscriber(txredisapi.SubscriberProtocol):
    """A connection that subscribes (txredisapi's pub/sub protocol): each message goes to its
    factory's ``on_message(pattern, channel, message)`` (``pattern`` None for a plain
    subscription). Commands other than (P)SUBSCRIBE and PING are not for it."""

    factory: Any  # set by RedisFactory.buildProtocol

    def messageReceived(self, pattern, channel, message) -> None:
        self.factory.on_message(pattern, channel, message)


def live_connection(factory: txredisapi.RedisFactory) -> txredisapi.RedisProtocol | None:
    """A connection of ``factory``'s pool that is up, to send on directly; None if none is."""
    return next((connection for connection in factory.pool if connection.connected), None)


def drop_connections(factory: txredisapi.RedisFactory | None) -> None:
    """Close every connection of ``factory``'s pool (None: no factory): each reconnects."""
    for connection in list(factory.pool) if factory is not None else ():
        connection.transport.loseConnection()
