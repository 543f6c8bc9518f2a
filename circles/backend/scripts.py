"""What the gateway asks of a script backend, and the ways running a script can fail.

The server never runs scripts. It hands a :class:`ScriptRequest` to an :class:`IScriptRunner`
(:class:`~circles.backend.dispatch.RedisScriptRunner` in production) and relays what comes back.
Keeping this interface small lets the protocol be tested without Redis and lets a deployment
plug in another backend.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

#: The largest script a play may carry (UTF-8 bytes), the server's default ``--max-script-size``:
#: the tiny engine's own MAX_SCRIPT (circles/worker/tiny_engine/values.py), so that the server
#: refuses what the worker would. A worker's init script is read within it too.
DEFAULT_MAX_SCRIPT_SIZE = 64 * 1024

SOURCE_WS = "ws"
SOURCE_STRIPE = "webhook:stripe"
SOURCE_IDENFY = "webhook:idenfy"
SOURCE_JOB = "job"  # a job of the hero contract's jobs methods (circles.server.jobs)
SOURCE_INIT = "init"  # an init script (circles.backend.init_scripts): its caller is the circle itself


@attrs.frozen
class ScriptRequest:
    circle: str  # compressed hex public key of the circle
    script: str
    caller: str  # compressed hex key of the authenticated caller, "" when anonymous
    source: str  # SOURCE_WS or a webhook source
    timeout: float  # seconds, already capped by the server


@attrs.frozen
class Queued:
    """What :meth:`IScriptRunner.enqueue_once` did: queued ``task_id`` now, or found the event
    already queued as ``task_id`` (``duplicate``)."""

    task_id: str
    duplicate: bool = False


class ScriptError(Exception):
    """Base of the failures a caller of :meth:`IScriptRunner.run` must expect."""


class ScriptTimeout(ScriptError):
    """No worker answered before the deadline; the task was marked expired. ``by_worker``: a
    worker ran the script and stopped it at its own script timeout instead."""

    def __init__(self, *args: object, by_worker: bool = False) -> None:
        super().__init__(*args)
        self.by_worker = by_worker


class BackendUnavailable(ScriptError):
    """The backend (Redis) cannot take the task now; nothing was queued."""


class BackendFull(BackendUnavailable):
    """Redis refuses writes because it is at its ``maxmemory`` (``noeviction``): nothing was
    queued. Its ``str()`` says so, for the caller."""


class NoWorker(ScriptError):
    """No live worker serves the circle (none has heartbeated within its TTL); nothing was queued."""


class NotAMember(ScriptError):
    """The circle's policy does not let the caller play (:mod:`circles.backend.members`); nothing
    was queued. ``policy``: the circle's policy as stored."""

    def __init__(self, policy: str) -> None:
        super().__init__(f"the circle's policy ({policy}) does not let the caller play")
        self.policy = policy


class ScriptFailed(ScriptError):
    """A worker ran the script and reported an error, carried in ``detail``; ``output`` is what
    the script printed before it ("" if nothing)."""

    def __init__(self, detail: str, output: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.output = output


class IScriptRunner(Interface):
    def run(request: ScriptRequest) -> Deferred:
        """Run ``request`` on the circle's workers; fire with the output text or fail with
        a :class:`ScriptError`. Cancelling the Deferred (the client is gone) stops waiting and
        keeps the script from running later if it can."""

    def is_connected() -> bool:
        """Whether scripts can be queued right now (``GET /ready`` reports it)."""

    def enqueue_once(request: ScriptRequest, data_json: str, key: str, ttl: int) -> Deferred:
        """Queue ``request`` with ``data_json`` (JSON text, stored as given) unless an event
        named ``key`` was queued in the last ``ttl`` seconds; claiming the name and queuing are
        one atomic step. Fire with a :class:`Queued`, or fail with :class:`BackendUnavailable`
        (then nothing was queued or claimed)."""


class IAdmittingScriptRunner(IScriptRunner):
    """A runner that reads the circle's policy in the step that queues a play."""

    def run_admitted(request: ScriptRequest) -> Deferred:
        """:meth:`IScriptRunner.run` if the circle's policy (:mod:`circles.backend.members`) lets
        ``request.caller`` play, read in the same step as queuing it (one round trip); else fail
        with :class:`NotAMember`, nothing queued."""
