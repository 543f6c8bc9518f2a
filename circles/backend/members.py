"""Who may play in a circle: a policy per circle, kept in Redis so every server sees the same.

``--auth`` proves who a caller is; the policy says whether that key may play. Two keys per
circle, with no TTL (an operator's decision lasts until it is changed)::

    {prefix}policy:{circle}    string: "members" (only the circle's members play); absent or
                               "open": any key plays (the default, and the original server's way)
    {prefix}members:{circle}   set of members' keys, compressed hex (circles.common.keys.normalize_pubkey)

Servers read both at each play, in the step that queues it (:data:`ADMITS` in
:data:`circles.backend.tasks.ENQUEUE`: a play refused writes nothing), so a change applies to the
next play of every connection, with no restart; :data:`MAY_PLAY` asks alone (a read-only script,
so a Redis at its maxmemory still answers it). Operators change them with ``circles members ...``, which uses the
functions here; any Redis client may too (``SADD``, ``SET``). Webhook events are not subject to
the policy (their signature is the provider's, not a member's).

The functions take anything that has txredisapi's ``execute_command`` (a connection, or a
factory's ``handler``), so that tests and tools can use them on a connection of their own.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from circles.backend.commands import CommandConnection
from circles.backend.redis_url import RedisAddress
from circles.backend.values import text
from circles.common.logs import Logger, worth_logging

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


#: The rule, as a Lua function of the policy key, the members key and the caller's key ("":
#: anonymous), answering whether the caller may play and the policy. A policy that is neither
#: open nor members refuses: an operator's typo must not open a closed circle. Read-only. The one
#: place it is written: :data:`MAY_PLAY` and the script runner's queuing step
#: (:data:`circles.backend.tasks.ENQUEUE`, which reads it in the step that queues a play) call it.
ADMITS = """
local function admits(policy_key, members_key, caller)
  local policy = redis.call('GET', policy_key)
  if not policy or policy == 'open' then return true, 'open' end
  if policy == 'members' and caller ~= '' and redis.call('SISMEMBER', members_key, caller) == 1 then
    return true, policy
  end
  return false, policy
end
"""

# KEYS: policy, members. ARGV: the caller's key ("" anonymous). Returns {1 allowed | 0 refused,
# the policy}. Read-only (no shebang, so Redis 6 runs it too, and at maxmemory: a script is
# refused there only when it writes).
MAY_PLAY = ADMITS + """
local allowed, policy = admits(KEYS[1], KEYS[2], ARGV[1])
return {allowed and 1 or 0, policy}
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


async def members(redis, prefix: str, circle: str) -> list[str]:
    """The members of ``circle``, sorted."""
    return sorted(text(k) for k in await redis.execute_command("SMEMBERS", members_key(prefix, circle)))


class Membership(CommandConnection):
    """A server's view of the policies: :meth:`check` at each play, on a connection of its own
    (:class:`~circles.backend.commands.CommandConnection`).

    :param address: the Redis the script runner uses.
    :param reactor: connects, and times each check out (its IReactorTime).
    """

    def __init__(self, address: RedisAddress, *, reactor, prefix: str) -> None:
        super().__init__(address, reactor=reactor, timeout=CHECK_TIMEOUT, doing="say who may play")
        self.prefix = prefix
        self.unknown = 0  # checks that found a policy neither open nor members (logged: the 1st, 10th...)

    def check(self, circle: str, caller: str) -> Deferred:
        """Fire with the :class:`Verdict` for ``caller`` in ``circle``, or fail with
        :class:`~circles.backend.scripts.BackendUnavailable` when Redis cannot say within
        :data:`CHECK_TIMEOUT` seconds (waiting for this connection included: it may come up
        a moment after the script runner's, at start or after Redis came back).

        The Deferred is the caller's to cancel: the Redis command's own is never cancelled
        (a txredisapi connection matches replies to commands in order)."""
        verdict = self.command(lambda redis: may_play(redis, self.prefix, circle, caller))
        return verdict.addCallback(self.noted, circle)

    def noted(self, verdict: Verdict, circle: str) -> Verdict:
        """``verdict`` as it is, the policy noted (and logged, within bounds) when it is unknown;
        also for the verdicts of the script runner's queuing step."""
        if verdict.policy not in POLICIES:
            self.unknown += 1
            if worth_logging(self.unknown):
                log.warn("circle {circle} has the policy {policy!r} in Redis, neither open nor members: its plays "
                         "are refused ({n} so far); set it with `circles members policy {circle} open|members`",
                         circle=circle, policy=verdict.policy[:100], n=self.unknown)
        return verdict


def describe(policy: str, count: int | None = None) -> str:
    """A policy in words, for the command line."""
    if policy == OPEN:
        return "open: any key may play"
    if policy == MEMBERS:
        if count == 0:
            return "members: only its members may play, and it has none: every play is refused"
        who = "its members" if count is None else f"its {count} member{'s' if count != 1 else ''}"
        return f"members: only {who} may play"
    return f"{policy!r}: not a policy (open or members); every play is refused"
