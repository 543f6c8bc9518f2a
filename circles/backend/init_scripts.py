"""Init scripts: ``-k PK:FILE`` runs FILE once in the circle PK when its first worker comes up.

What "once" means (README, "Init scripts", says it for operators): once per circle and script
text, for as long as the Redis keeps its data. Whoever runs it first claims a key in Redis,
:func:`once_key` (``{prefix}init:{circle}:{sha256 of the script}``), with ``SET NX`` (the
:data:`CLAIM` step): so N server processes, N servers behind a balancer, and a worker given the
same ``-k PK:FILE`` run it once between them. The claim lives while the script runs (its
timeout and :data:`CLAIM_GRACE`); a script that completed leaves the key for good, saying so
(:data:`COMPLETE`): a restart with the same script does not run it again, a changed script
runs (once). A script that failed, timed out, or was cut short (the server stopped) gives the
key up (:data:`RELEASE`): the next start of a server or worker given it runs it again. To run a
completed script again, delete its key (``circles:init:{circle}:*``).

Two places run one, both with the circle itself as the caller and the source ``init``:

- a server (:class:`InitScripts`): it learns that the circle has a live worker from its
  housekeeping round (:mod:`circles.backend.housekeeping`: the live workers of its circles,
  read every heartbeat interval already; nothing more is asked of Redis while it waits), then
  claims the key and queues the script as a play (:meth:`IScriptRunner.run`), and logs the
  outcome;
- a worker (:class:`circles.worker.service.Worker`): it claims the key before its first
  heartbeat (so no server sees it live before the claim is in), runs the script itself, and
  takes that circle's tasks once the script ended.
"""

from __future__ import annotations

import datetime
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from txredisapi import RedisError

from circles.backend.scripts import (
    SOURCE_INIT,
    BackendUnavailable,
    NoWorker,
    ScriptError,
    ScriptRequest,
    ScriptTimeout,
)
from circles.backend.values import text
from circles.common.keys import InvalidKey, normalize_pubkey
from circles.common.logs import Logger

log = Logger()

#: Seconds a claim outlives the script's timeout: a claimer that died mid-run holds the key no
#: longer than that, after which the next start runs the script again.
CLAIM_GRACE = 60
#: Characters of an init script's output or error quoted in its log line (the rest counted).
LOGGED = 2000

# KEYS: the once key. ARGV: this claimer's token, ttl. Returns {1, token} when claimed (or
# claimed by this same claimer already: a claim whose release was lost is taken again), else
# {0, what the key says}.
CLAIM = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return {1, ARGV[1]}
end
return {0, held}
"""

# KEYS: the once key. ARGV: token, what it says from now on (kept without TTL). Returns 1, or 0
# if the claim was no longer this claimer's (it expired).
COMPLETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the once key. ARGV: token. Returns 1 if the key was this claimer's and is gone.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


class InitScriptError(ValueError):
    """A ``-k PK:FILE`` that cannot be used; the message says why, in one line."""


@attrs.frozen
class InitScript:
    """An init script as given: its circle (compressed hex), its text, and its file (for the logs)."""

    circle: str
    script: str = attrs.field(repr=False)
    path: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.script.encode("utf-8")).hexdigest()


def once_key(prefix: str, init: InitScript) -> str:
    """The key that says an init script ran (or runs) in its circle."""
    return f"{prefix}init:{init.circle}:{init.digest}"


def split_circle(value: str) -> tuple[str, str | None]:
    """``PK`` or ``PK:FILE`` as ``(PK, FILE or None)``, split at the first ``:`` (a path may
    have more)."""
    key, colon, path = value.partition(":")
    if colon and not path:
        raise InitScriptError(f"{value!r}: no init script after ':' (PK or PK:FILE)")
    return key, path if colon else None


def read_init_script(path: str, max_size: int, limit: str = "--max-script-size") -> str:
    """The text of an init script file: UTF-8, not empty, at most ``max_size`` bytes (``limit``
    names that bound in the error)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_size + 1)
    except OSError as e:
        raise InitScriptError(f"cannot read init script {path}: {e.strerror or e.__class__.__name__}") from None
    if len(data) > max_size:
        raise InitScriptError(f"init script {path} is larger than {max_size} bytes ({limit})")
    try:
        script = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InitScriptError(f"init script {path} is not UTF-8 text") from None
    if not script.strip():
        raise InitScriptError(f"init script {path} is empty")
    return script


def parse_circles(values: Iterable[str], max_size: int,
                  limit: str = "--max-script-size") -> tuple[list[str], tuple[InitScript, ...]]:
    """``-k`` values (``PK`` or ``PK:FILE``) as ``(circles, init scripts)``: each circle in
    compressed hex, each file read (:func:`read_init_script`). One circle may have one init
    script (the same file, or the same text, given twice is one)."""
    circles: list[str] = []
    inits: dict[str, InitScript] = {}
    for value in values:
        key, path = split_circle(value)
        try:
            circle = normalize_pubkey(key)
        except InvalidKey as e:
            raise InitScriptError(f"invalid circle {key!r}: {e}") from None
        circles.append(circle)
        if path is None:
            continue
        init = InitScript(circle, read_init_script(path, max_size, limit), path)
        other = inits.setdefault(circle, init)
        if other.script != init.script:
            raise InitScriptError(f"circle {circle} has two init scripts ({other.path}, {path}): give one")
    return circles, tuple(inits.values())


def stamp(clock: IReactorTime) -> str:
    """Now, as the once key's value says it: ISO 8601, UTC, to the second."""
    return datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC).isoformat(timespec="seconds")


def claim_ttl(timeout: float) -> int:
    return math.ceil(timeout) + CLAIM_GRACE


def quoted(value: str) -> str:
    """An init script's output or error for a log line: at most :data:`LOGGED` characters, control
    characters escaped (``repr``), so what a script wrote cannot add a line to the log."""
    if len(value) > LOGGED:
        return repr(value[:LOGGED]) + f" (+{len(value) - LOGGED} characters)"
    return repr(value)


#: Runs a Lua step: ``(script, keys, args)`` -> Deferred (Redis trouble fails it).
Evaluate = Callable[[str, list, list], Deferred]


def failed(init: InitScript, why: str, error: str, output: str) -> None:
    """Say loudly that ``init`` failed (``why``: error or timeout): not fatal, it runs at the next start."""
    log.error("init script {path} of circle {circle} FAILED ({why}): {error}; its output: {output}. It runs "
              "again at the next start of a server or worker given it", path=init.path, circle=init.circle,
              why=why, error=quoted(error or why), output=quoted(output))


async def ran(evaluate: Evaluate, init: InitScript, key: str, token: str, done: str, output: str) -> None:
    """Record that ``init`` ran (its once key says ``done`` for good) and say so, with its output."""
    try:
        kept = int(await evaluate(COMPLETE, [key], [token, done]))
    except (BackendUnavailable, RedisError) as e:
        kept = 0
        log.warn("init script {path} of circle {circle}: could not record that it ran ({error})",
                 path=init.path, circle=init.circle, error=str(e))
    log.info("init script {path} of circle {circle} ran{note}; its output: {output}", path=init.path,
             circle=init.circle, output=quoted(output), note="" if kept else " (its claim had lapsed: it may run again)")


async def give_back(evaluate: Evaluate, key: str, token: str) -> None:
    """Give the claim up, so a later start runs the script; Redis trouble leaves it to lapse."""
    try:
        await evaluate(RELEASE, [key], [token])
    except (BackendUnavailable, RedisError):
        pass


class InitScripts(Service):
    """A server's init scripts: each one is queued once its circle's first live worker is seen.

    :param scripts: the init scripts (their circles must be among those housekeeping reads).
    :param run: :meth:`IScriptRunner.run <circles.backend.scripts.IScriptRunner.run>`.
    :param command: runs a Redis command (``"eval", script, keys, args``); Redis trouble fails
        it with :class:`BackendUnavailable` (as :meth:`RedisScriptRunner.command
        <circles.backend.dispatch.RedisScriptRunner.command>`).
    :param who: names this server in the once key (``server <id>``), for whoever reads it.
    :param timeout: seconds the script may take (the server's ``--script-timeout``).

    :meth:`workers_seen` is housekeeping's watcher: called with ``{circle: (live workers, queue
    length)}`` after each round.
    """

    def __init__(self, scripts: Iterable[InitScript], run: Callable[[ScriptRequest], Deferred],
                 command: Callable[..., Deferred], *, clock: IReactorTime, prefix: str, who: str,
                 timeout: float) -> None:
        self.waiting = {init.circle: init for init in scripts}  # not run (nor given up on) yet
        self._run = run
        self._command = command
        self.clock = clock
        self.prefix = prefix
        self.who = who
        self.timeout = timeout
        self._token = ""  # what a claim of this server says (fixed at its first)
        self._in_flight: dict[str, Deferred] = {}  # circle -> its claim and run
        self._told_unavailable: set[str] = set()  # circles whose script Redis could not take, logged once

    def startService(self) -> None:
        super().startService()
        for init in self.waiting.values():
            log.info("init script {path} of circle {circle}: waiting for the circle's first worker",
                     path=init.path, circle=init.circle)

    def stopService(self) -> Deferred:
        """Cancel the runs in flight (their tasks are expired, their keys given up), and wait for that."""
        super().stopService()
        running = list(self._in_flight.values())
        for d in running:
            d.cancel()
        return DeferredList(running, consumeErrors=True)

    def workers_seen(self, stats: Mapping[str, tuple[int | None, int]]) -> None:
        """Housekeeping read the live workers of the circles: start the init script of each
        circle that has one now. A count of None (a dispatcher protocol whose workers do not
        register, ``--worker-protocol hero``) starts it at once: the job waits on the circle's
        work queue for the first worker to take it, up to the script's timeout."""
        if not self.running:
            return
        for circle, (workers, _) in stats.items():
            if (workers is None or workers) and circle in self.waiting and circle not in self._in_flight:
                d = ensureDeferred(self._claim_and_run(self.waiting[circle]))
                if not d.called:
                    self._in_flight[circle] = d  # until it ends (it takes itself off)

    async def _claim_and_run(self, init: InitScript) -> None:
        try:
            await self._claim_and_run_once(init)
        except Exception:
            log.failure("running the init script of circle {circle}", circle=init.circle)
        finally:
            self._in_flight.pop(init.circle, None)

    async def _claim_and_run_once(self, init: InitScript) -> None:
        key = once_key(self.prefix, init)
        if not self._token:
            self._token = f"running: {self.who} since {stamp(self.clock)}"
        try:
            claimed, held = await self._command("eval", CLAIM, [key], [self._token, claim_ttl(self.timeout)])
        except (BackendUnavailable, RedisError, CancelledError):
            return  # Redis trouble (or stopping): the next round that sees a worker tries again
        if not int(claimed):
            del self.waiting[init.circle]
            log.info("init script {path} of circle {circle}: not run by this server ({key}: {held})",
                     path=init.path, circle=init.circle, key=key, held=text(held))
            return
        log.info("init script {path} of circle {circle}: the circle has a worker; queued", path=init.path,
                 circle=init.circle)
        request = ScriptRequest(init.circle, init.script, caller=init.circle, source=SOURCE_INIT,
                                timeout=self.timeout)
        try:
            output = await self._run(request)
        except CancelledError:
            await self._release(key)
            log.warn("init script {path} of circle {circle}: not finished when the server stopped; it runs again "
                     "at the next start", path=init.path, circle=init.circle)
            return
        except NoWorker:
            await self._release(key)  # nothing was queued: wait for a worker again
            log.info("init script {path} of circle {circle}: the circle's worker left before it was queued; "
                     "waiting for a worker again", path=init.path, circle=init.circle)
            return
        except BackendUnavailable as e:
            # Nothing queued, or the reply lost with Redis (the task is then expired): once Redis
            # and a worker are there again, the script is queued again (said once per circle).
            await self._release(key)
            if init.circle in self._told_unavailable:
                return
            self._told_unavailable.add(init.circle)
            log.warn("init script {path} of circle {circle}: not run ({error}); queued again once Redis and a "
                     "worker are there", path=init.path, circle=init.circle, error=str(e))
            return
        except ScriptError as e:
            del self.waiting[init.circle]
            await self._release(key)
            failed(init, "timeout" if isinstance(e, ScriptTimeout) else "error",
                   getattr(e, "detail", None) or str(e), getattr(e, "output", ""))
            return
        del self.waiting[init.circle]
        await ran(self._evaluate, init, key, self._token, f"completed: {self.who} at {stamp(self.clock)}", output)

    def _evaluate(self, script: str, keys: list, args: list) -> Deferred:
        return self._command("eval", script, keys, args)

    async def _release(self, key: str) -> None:
        await give_back(self._evaluate, key, self._token)
