"""A private ``redis-server`` for a server started without ``--redis-url``.

So a first run needs nothing else: the service starts the ``redis-server`` found on PATH, bound
only to a unix socket (``redis.sock``, mode 0700) in the state directory, no TCP port, no disk
persistence unless asked, and stops it when the service stops. On Linux the child also gets a
parent-death signal (``PR_SET_PDEATHSIG``), so even a killed server leaves no Redis behind.
A redis-server that exits on its own once it has answered (killed, out of memory) is started
again on the same socket (:class:`~circles.common.children.RestartDelay`), where the server's script
runner and the workers reconnect by themselves; without ``--redis-persist`` its data is gone.

It runs with a ``maxmemory`` (:func:`derived_maxmemory` from the server's limits, or
``--redis-maxmemory``) and ``maxmemory-policy noeviction``: a full Redis refuses writes, which
the server answers clearly (plays -32004, webhooks 503, ``/ready`` 503), rather than growing
until the machine swaps or the OOM killer picks a process, or evicting tasks and nonces.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from collections import deque

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IProcessTransport, ITransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from circles.backend.redis_url import RedisAddress
from circles.common.children import RestartDelay, dies_with_this_process, terminate
from circles.common.logs import Logger
from circles.common.once import Once

log = Logger()

SOCKET_NAME = "redis.sock"
#: The state directory the twistd plugins use; a Config built by hand has None (a temporary one).
DEFAULT_STATE_DIR = "circles-state"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_MAX_UNIX_PATH = 107


# -- maxmemory ----------------------------------------------------------------------------------
# What the private Redis may hold, derived from the server's limits (docs/deployment.md, "Sizing
# Redis's maxmemory"):
#
#   maxmemory = clamp(BASE + plays in flight x (script + output + TASK_OVERHEAD) + webhook allowance,
#                     FLOOR, min(CEILING, a quarter of the memory: the machine's, or its container's limit))
#
#   plays in flight   = server processes x --max-connections x --max-plays (either 0: no bound)
#   script            = --max-script-size (at most --max-message-size: no larger script arrives)
#   output            = --max-message-size (the worker refuses a larger output before writing it)
#   webhook allowance = WEBHOOK_EVENTS x (--max-request-body + TASK_OVERHEAD), when a webhook
#                       provider is configured, else 0
#
#: Redis itself, nonces, de-duplication keys of webhook events, members sets, queues.
MAXMEMORY_BASE = 32 * 1024 * 1024
#: The bounds of a derived maxmemory: never less than FLOOR, never more than CEILING nor a
#: quarter of the machine's memory. The default limits (10,000 connections x 100 plays) allow
#: more than any machine has, so the ceiling is what they get.
MAXMEMORY_FLOOR = 64 * 1024 * 1024
MAXMEMORY_CEILING = 1024 * 1024 * 1024
#: Bytes of a task besides its script and output: its other fields, key, queue entry, reply.
TASK_OVERHEAD = 1024
#: Webhook events the allowance holds waiting for a worker (each at most --max-request-body).
WEBHOOK_EVENTS = 256


#: Where a container's memory limit is read (cgroup v2, then v1): the machine's memory is not
#: what a container may use.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def physical_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its container's limit if lower;
    None where the platform does not say."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        memory = None
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as f:
                limit = int(f.read().strip())  # "max" (none) is not a number
        except (OSError, ValueError):
            continue
        if memory is None or 0 < limit < memory:  # v1 says "none" with a huge number
            memory = limit
        break
    return memory


def derived_maxmemory(*, max_connections: int, max_plays: int, max_script: int, max_output: int,
                      webhook_body: int = 0, processes: int = 1, physical: int | None = None) -> int:
    """The private Redis's ``maxmemory`` in bytes for a server with these limits (the formula
    above). ``webhook_body``: the largest webhook body, 0 when no webhook provider is on;
    ``physical``: the machine's memory (None: not known, only CEILING bounds)."""
    ceiling = MAXMEMORY_CEILING if not physical else min(MAXMEMORY_CEILING, physical // 4)
    ceiling = max(ceiling, MAXMEMORY_FLOOR)
    if not (max_connections and max_plays):
        return ceiling  # no bound on plays in flight
    in_flight = max(1, processes) * max_connections * max_plays
    per_play = min(max_script, max_output) + max_output + TASK_OVERHEAD
    webhooks = WEBHOOK_EVENTS * (webhook_body + TASK_OVERHEAD) if webhook_body else 0
    return max(MAXMEMORY_FLOOR, min(ceiling, MAXMEMORY_BASE + in_flight * per_play + webhooks))


def describe_bytes(n: int) -> str:
    """``n`` bytes for a log line: ``1 GiB``, ``96.5 MiB``, ``900 bytes``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{round(n / size, 1):g} {unit}"
    return f"{n} bytes"


class EmbeddedRedisError(Exception):
    """The private Redis cannot run; ``str()`` is the operator's one-line message."""


def find_redis_server(binary: str = "redis-server") -> str:
    """The full path of ``binary``, or :class:`EmbeddedRedisError` saying what to do."""
    path = shutil.which(binary)
    if path is None:
        raise EmbeddedRedisError(
            f"{binary} not found on PATH: install Redis (e.g. apt install redis-server) "
            "or point the server at one with --redis-url")
    return path


def _answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (instant, local)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def refuse_a_state_dir_in_use(socket_path: str) -> None:
    """:class:`EmbeddedRedisError` if a Redis answers on ``socket_path`` (another server's)."""
    if _answers(socket_path):
        raise EmbeddedRedisError(f"a Redis is already running on {socket_path}: "
                                 "another server uses this --state-dir")


class _RedisProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ended = Once()  # the exception saying how it ended
        self.output: deque = deque(maxlen=20)
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.output.append(line)
                log.debug("redis-server: {line}", line=line)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.fire(reason.value)  # a Failure given to fire() would fail the waiters


class _Ping(Protocol):
    transport: ITransport  # set before any callback

    def connectionMade(self) -> None:
        self.answer: Deferred = Deferred()
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data.startswith(b"+PONG"))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answer.called:
            self.answer.callback(False)


#: Makes the readiness probes, without a "Starting factory" line at info for each.
_PING = Factory.forProtocol(_Ping)
_PING.noisy = False


class EmbeddedRedis(Service):
    """Runs ``redis-server`` on :attr:`address` (a unix socket) while the service runs.

    :param state_dir: where the socket lives; an existing directory is kept (and must not have a
        live Redis in it). None: a private temporary directory, named now (the address is needed
        before the start: the dispatcher is given it), made at each start, removed on stop.
    :param persist: keep data across restarts (append-only file in ``state_dir``).
    :param maxmemory: Redis's ``maxmemory`` in bytes (0: none), always with ``maxmemory-policy
        noeviction``; None: :data:`MAXMEMORY_FLOOR`. A server gives :func:`derived_maxmemory`.
    """

    def __init__(self, state_dir: str | None, *, reactor, binary: str = "redis-server",
                 persist: bool = False, maxmemory: int | None = None) -> None:
        self.reactor = reactor
        self.binary = binary
        self.persist = persist
        self.maxmemory = MAXMEMORY_FLOOR if maxmemory is None else maxmemory
        self.temporary = state_dir is None
        if state_dir is None:
            # Unpredictable, and made with an exclusive mkdir: a directory someone else made is refused.
            state_dir = os.path.join(tempfile.gettempdir(), f"circles-redis-{secrets.token_hex(8)}")
        self.state_dir = os.path.abspath(state_dir)
        self.socket_path = os.path.join(self.state_dir, SOCKET_NAME)
        if len(self.socket_path.encode()) > _MAX_UNIX_PATH:
            raise EmbeddedRedisError(f"state directory path too long for a unix socket: {self.state_dir}")
        self.address = RedisAddress(path=self.socket_path)
        self._process: _RedisProcess | None = None
        self._transport: IProcessTransport | None = None
        self._answered = False  # since the start: the server runs on it
        self._stopping = False
        self._delay: RestartDelay | None = None
        self._restart = None  # the pending callLater starting a redis-server that exited again

    def _make_state_dir(self) -> None:
        """Create the state directory, mode 0700: a given one unless it exists, a temporary one
        anew (:class:`EmbeddedRedisError` if something is there already)."""
        if not self.temporary:
            try:
                os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            except OSError as e:
                raise EmbeddedRedisError(f"cannot make the state directory {self.state_dir} (--state-dir): "
                                         f"{e.strerror}") from None
            return
        try:
            os.mkdir(self.state_dir, 0o700)
        except OSError as e:
            raise EmbeddedRedisError(f"cannot make the private directory {self.state_dir}: {e.strerror}") from None

    def startService(self) -> None:
        find_redis_server(self.binary)
        self._make_state_dir()
        refuse_a_state_dir_in_use(self.socket_path)
        super().startService()
        self._stopping = False
        self._answered = False
        self._delay = RestartDelay(self.reactor)
        self._spawn()
        ensureDeferred(self._first_answer())

    async def _first_answer(self) -> None:
        try:
            await self._wait_until_ready()
        except Exception:
            log.error("{error}", error=Failure().getErrorMessage())
            return
        self._answered = True

    def _spawn(self) -> None:
        args = [find_redis_server(self.binary), "--port", "0", "--unixsocket", self.socket_path,
                "--unixsocketperm", "700", "--dir", self.state_dir, "--daemonize", "no", "--logfile", "",
                "--save", ""]
        args += ["--appendonly", "yes"] if self.persist else ["--appendonly", "no"]
        # Full is refused (OOM), never evicted: a task, nonce or webhook event dropped silently
        # would be a lost play or event.
        args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "noeviction"]
        argv = dies_with_this_process(args)
        process = self._process = _RedisProcess()
        transport = self._transport = self.reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ),
                                                                path=self.state_dir)
        assert self._delay is not None  # made by startService
        self._delay.started()
        # Its pid is not the event's ``pid``: that is this process's (circles.common.logs.tag).
        log.info("started a private redis-server (pid {redis_pid}) on {path}, maxmemory {maxmemory} (noeviction)",
                 redis_pid=transport.pid, path=self.socket_path,
                 maxmemory=describe_bytes(self.maxmemory) if self.maxmemory else "none")
        process.ended.when().addCallback(self._ended)

    def _ended(self, reason: Exception) -> None:
        if self._stopping:
            return
        assert self._process is not None and self._delay is not None  # it was started
        log.error("the private redis-server exited unexpectedly ({why}); last output: {output}",
                  why=str(reason), output=" | ".join(self._process.output))
        if self.running and self._answered:
            # It had answered: the server runs on it. Not at start, where the start fails.
            delay = self._delay.after_exit()
            log.info("starting the private redis-server again in {delay:g}s", delay=delay)
            self._restart = self.reactor.callLater(delay, self._start_again)

    def _start_again(self) -> None:
        self._restart = None
        try:
            refuse_a_state_dir_in_use(self.socket_path)
        except EmbeddedRedisError as e:
            # Someone else's Redis took the socket: using it would mix two servers' data.
            log.error("{error}: not starting ours again", error=str(e))
            return
        self._spawn()
        ensureDeferred(self._answers_again())

    async def _answers_again(self) -> None:
        try:
            await self._wait_until_ready()
        except Exception:
            return  # it exited again: _ended says so and tries later
        log.info("the private redis-server answers again")

    async def _wait_until_ready(self) -> None:
        """Return once the redis-server just spawned answers a PING; fail if it exits first or
        does not answer within START_TIMEOUT."""
        process = self._process
        assert process is not None  # just spawned
        deadline = self.reactor.seconds() + START_TIMEOUT
        while True:
            if process.ended.fired:
                raise EmbeddedRedisError("redis-server exited at start: " + " | ".join(process.output))
            try:
                ping = await UNIXClientEndpoint(self.reactor, self.socket_path, timeout=1).connect(_PING)
                if await ping.answer:
                    return
            except Exception:
                pass
            if self.reactor.seconds() > deadline:
                raise EmbeddedRedisError(f"redis-server did not answer within {START_TIMEOUT:.0f}s")
            await deferLater(self.reactor, 0.05, lambda: None)

    def stopService(self) -> Deferred:
        """Stop redis-server (SIGTERM, SIGKILL after STOP_TIMEOUT); fires once it exited."""
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        self._stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        process, transport = self._process, self._transport
        if process is None or transport is None:
            return
        await terminate(self.reactor, transport, process.ended, STOP_TIMEOUT)
        log.info("stopped the private redis-server")
        if self.temporary:
            shutil.rmtree(self.state_dir, ignore_errors=True)
