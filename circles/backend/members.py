"""Who may play in a circle: a policy per circle, kept in Redis so every server sees the same.

``--auth`` proves who a caller is; the policy says whether that key may play. Two keys per
circle, with no TTL (an operator's decision lasts until it is changed)::

    {prefix}policy:{circle}    string: "members" (only the circle's members play); absent or
                               "open": any key plays (the default, and the original server's way)
    {prefix}members:{circle}   set of members' keys, compressed hex (circles.keys.normalize_pubkey)

Servers read both at each play, in one round trip (:data:`MAY_PLAY`, a read-only script, so a
Redis at its maxmemory still answers it), so a change applies to the next play of every
connection, with no restart. Operators change them with ``circles members ...``, which uses the
functions here; any Redis client may too (``SADD``, ``SET``). Webhook events are not subject to
the policy (their signature is the provider's, not a member's).

The functions take anything that has txredisapi's ``execute_command`` (a connection, or a
factory's ``handler``), so that tests and tools can use them on a connection of their own.
"""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.python.failure import Failure
from txredisapi import RedisError

from circles.backend.redis import RedisAddress, connect, text
from circles.backend.scripts import BackendUnavailable
from circles.logs import Logger, worth_logging
from circles.once import Once

log = Logger()

OPEN = "open"
MEMBERS = "members"
POLICIES = (OPEN, MEMBERS)
DEFAULT_POLICY = OPEN
#: Seconds a policy check may wait for Redis before the play is refused (-32004).
CHECK_TIMEOUT = 5.0


def policy_key(prefix: str, circle: str) -> str:
    return f"{prefix}policy:{circle}"


def members_key(prefix: str, circle: str) -> str:
    return f"{prefix}members:{circle}"


# KEYS: policy, members. ARGV: the caller's key ("" anonymous). Returns {1 allowed | 0 refused,
# the policy}. Read-only (no shebang, so Redis 6 runs it too, and at maxmemory: a script is
# refused there only when it writes). A policy that is neither open nor members refuses: an
# operator's typo must not open a closed circle.
MAY_PLAY = """
local policy = redis.call('GET', KEYS[1])
if not policy or policy == 'open' then return {1, 'open'} end
if policy == 'members' and ARGV[1] ~= '' and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return {1, policy}
end
return {0, policy}
"""


@attrs.frozen
class Verdict:
    """Whether a caller may play in a circle, and the circle's policy."""

    allowed: bool
    policy: str


async def may_play(redis, prefix: str, circle: str, caller: str) -> Verdict:
    """Whether ``caller`` (compressed hex, "" when anonymous) may play in ``circle``."""
    allowed, policy = await redis.execute_command("EVAL", MAY_PLAY, 2, policy_key(prefix, circle),
                                                  members_key(prefix, circle), caller)
    return Verdict(bool(int(allowed)), text(policy))


async def get_policy(redis, prefix: str, circle: str) -> str:
    """The circle's policy as stored (:data:`DEFAULT_POLICY` when none is)."""
    return text(await redis.execute_command("GET", policy_key(prefix, circle))) or DEFAULT_POLICY


async def set_policy(redis, prefix: str, circle: str, policy: str) -> None:
    """Make ``circle`` ``open`` (its key removed: open is the default) or ``members``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: {' or '.join(POLICIES)}")
    if policy == DEFAULT_POLICY:
        await redis.execute_command("DEL", policy_key(prefix, circle))
    else:
        await redis.execute_command("SET", policy_key(prefix, circle), policy)


async def add(redis, prefix: str, circle: str, key: str) -> bool:
    """Make ``key`` (compressed hex) a member of ``circle``; False if it was one already."""
    return bool(int(await redis.execute_command("SADD", members_key(prefix, circle), key)))


async def remove(redis, prefix: str, circle: str, key: str) -> bool:
    """``key`` is no longer a member of ``circle``; False if it was not one."""
    return bool(int(await redis.execute_command("SREM", members_key(prefix, circle), key)))


async def members(redis, prefix: str, circle: str) -> "list[str]":
    """The members of ``circle``, sorted."""
    return sorted(text(k) for k in await redis.execute_command("SMEMBERS", members_key(prefix, circle)))


class Membership(Service):
    """A server's view of the policies: :meth:`check` at each play, on a connection of its own
    (the script runner's are busy with tasks and replies), reconnecting by itself.

    :param address: the Redis the script runner uses.
    :param reactor: connects, and times each check out (its IReactorTime).
    """

    def __init__(self, address: RedisAddress, *, reactor, prefix: str) -> None:
        self.address = address
        self.reactor = reactor
        self.prefix = prefix
        self._redis = None  # txredisapi factory, while running
        self._connecting: Optional[Once] = None  # fires once the connection is up, while checks wait for it
        self.failures = 0  # checks Redis answered with an error (logged: the 1st, 10th, 100th...)
        self.unknown = 0  # checks that found a policy neither open nor members (logged likewise)

    def startService(self) -> None:
        super().startService()
        self._redis = connect(self.address, self.reactor, reply_timeout=CHECK_TIMEOUT)
        # Reaching Redis, and Redis refusing the credentials, are the script runner's to tell.
        self._redis.deferred.addErrback(lambda _: None)

    def stopService(self):
        super().stopService()
        redis, self._redis = self._redis, None
        return None if redis is None else redis.disconnect()

    def check(self, circle: str, caller: str) -> Deferred:
        """Fire with the :class:`Verdict` for ``caller`` in ``circle``, or fail with
        :class:`~circles.backend.scripts.BackendUnavailable` when Redis cannot say within
        :data:`CHECK_TIMEOUT` seconds (waiting for this connection included: it may come up
        a moment after the script runner's, at start or after Redis came back).

        The Deferred is the caller's to cancel: the Redis command's own is never cancelled
        (a txredisapi connection matches replies to commands in order)."""
        redis = self._redis
        if redis is None:
            return fail(BackendUnavailable("Redis is unreachable"))
        verdict = Deferred()
        timer = self.reactor.callLater(CHECK_TIMEOUT, _too_slow, verdict)
        d = ensureDeferred(self._ask(redis, circle, caller))
        d.addCallbacks(lambda v: self._verdict(v, circle), self._unavailable)
        d.addBoth(_pass_on, verdict)
        verdict.addBoth(_cancel_timer, timer)
        return verdict

    async def _ask(self, redis, circle: str, caller: str) -> Verdict:
        if redis.size == 0:
            await self._connected(redis)
        return await may_play(redis.handler, self.prefix, circle, caller)

    def _connected(self, redis) -> Deferred:
        """Fires once ``redis`` has a connection: one wait shared by every check meanwhile."""
        if self._connecting is None:
            connecting = self._connecting = Once()

            def up(result) -> None:
                self._connecting = None
                connecting.fire(result)

            try:
                d = redis.getConnection(peek=True)
            except RedisError:
                d = fail()
            d.addBoth(up)
        return self._connecting.when()

    def _verdict(self, verdict: Verdict, circle: str) -> Verdict:
        if verdict.policy not in POLICIES:
            self.unknown += 1
            if worth_logging(self.unknown):
                log.warn("circle {circle} has the policy {policy!r} in Redis, neither open nor members: its plays "
                         "are refused ({n} so far); set it with `circles members policy {circle} open|members`",
                         circle=circle, policy=verdict.policy[:100], n=self.unknown)
        return verdict

    def _unavailable(self, failure):
        if failure.check(RedisError):
            self.failures += 1
            if worth_logging(self.failures):
                log.warn("Redis could not say who may play: {error} ({n} failed checks so far)",
                         error=failure.getErrorMessage(), n=self.failures)
            raise BackendUnavailable(f"Redis error: {failure.getErrorMessage()}")
        return failure


def _too_slow(verdict: Deferred) -> None:
    if not verdict.called:
        verdict.errback(BackendUnavailable(f"Redis did not answer within {CHECK_TIMEOUT:g}s"))


def _cancel_timer(result, timer):
    if timer.active():
        timer.cancel()
    return result


def _pass_on(result, to: Deferred) -> None:
    if to.called:  # cancelled: nobody waits
        return
    if isinstance(result, Failure):
        to.errback(result)
    else:
        to.callback(result)


def describe(policy: str, count: Optional[int] = None) -> str:
    """A policy in words, for the command line."""
    if policy == OPEN:
        return "open: any key may play"
    if policy == MEMBERS:
        if count == 0:
            return "members: only its members may play, and it has none: every play is refused"
        who = "its members" if count is None else f"its {count} member{'s' if count != 1 else ''}"
        return f"members: only {who} may play"
    return f"{policy!r}: not a policy (open or members); every play is refused"
