"""Several server processes on one port, so one host serves with all its cores.

``--processes N`` makes the process twistd started the first of N. All accept from one listening
socket, the first process's, which the others inherit; which of them takes a connection is
:mod:`circles.server.processes.accept`'s (the one holding the fewest, or whoever has time). They
share nothing else but Redis (each has its own script runner and reply list, as separate hosts would). The first
process starts the private Redis, if any, and the N-1 others with the same options pointed at
it; they die with it (parent-death signal) and stop when it stops. One that exits while
serving is started again (see :class:`~circles.common.children.RestartDelay`), so N stay N.

They are numbered 1 (the first) to N, as the log lines name them; a process started again in
another's place takes its number.

One log. The others do not write a log of their own (under ``twistd`` without ``-n`` theirs
would go nowhere): each writes every event to its standard output as one line
(:func:`circles.common.logs.relay_observer`), a pipe the first process reads here, whole lines only,
and publishes each event as its own, tagged with the sender's ``pid`` and ``process``
(:func:`circles.common.logs.tag`), so that they go where twistd sends this process's events
(``--logfile``, ``--logger``) and no two lines interleave. What else a process writes (its
standard error, a line that is no event) is logged as a line of text of that process. A line
longer than :data:`MAX_LINE` is dropped with a note: the relay never holds more than that.

Privileges. The first process binds the port (``SO_REUSEPORT``, as ``--reuse-port`` does, so that
a new server can take over the port from an old one) before ``twistd`` drops privileges
(``--uid``), and hands its listening socket to each of the others as descriptor 3
(:data:`ENV_LISTEN_FD`), with the :class:`~circles.server.processes.accept.Holdings` as
descriptor 4 (:data:`ENV_HOLDINGS_FD`): the others never bind, so a port under 1024 works for them
too. The socket outlives any process using it, for the one started again in its place. One that
exits leaves nothing queued behind it (the queue is everyone's: the others accept what it would
have; the connections it held are reset by the kernel as it exits), and its place in the
Holdings is marked absent, so that nobody leaves connections to it, until the one started again
in its place accepts, unprivileged.

Why one socket rather than one per process (``SO_REUSEPORT``, each its own queue, as before): the
kernel hashed each connection's addresses to a process, blind to load, so 50 connections split
anywhere from 17/33 to 25/25 and a process whose queue was full or that hung (``SIGSTOP``) held its
connections waiting while the others idled; and a steering program (``SO_ATTACH_REUSEPORT_CBPF``)
has no state to count with, only the packet, the CPU and a random number (docs/benchmarks.md,
"--processes: CPU per request and the spread of connections").

One ``/metrics``, one ``/ready``: :mod:`circles.server.processes.siblings`, through a private directory given to
the others in the environment (:data:`ENV_PROCESS`, :data:`ENV_PROCESSES`, :data:`ENV_DIRECTORY`,
:data:`ENV_GENERATION`).
"""

from __future__ import annotations

import os
import socket
import sys

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProcessTransport, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer

from circles.common.children import RestartDelay, dies_with_this_process, how_it_ended, terminate
from circles.common.logs import RELAY_LINE_LIMIT, Logger, relayed_event, tag
from circles.common.once import Once
from circles.server.processes.accept import ABSENT, Holdings, SharedPort
from circles.server.tls import tls_factory

log = Logger()

#: The environment of the other processes: their number (2..N), N, and the private directory of
#: :mod:`circles.server.processes.siblings`.
ENV_PROCESS, ENV_PROCESSES, ENV_DIRECTORY = "CIRCLES_PROCESS", "CIRCLES_PROCESSES", "CIRCLES_PROCESS_DIR"
#: Which start in its number's place a process is: 1, then 2 for the one started again in its
#: place, and so on (the first process's count of the server's counts tells them apart).
ENV_GENERATION = "CIRCLES_PROCESS_GENERATION"
#: The descriptor of the listening socket the first process gives the others.
ENV_LISTEN_FD = "CIRCLES_LISTEN_FD"
LISTEN_FD = 3
#: The descriptor of the :class:`~circles.server.processes.accept.Holdings` the first process gives the others.
ENV_HOLDINGS_FD = "CIRCLES_HOLDINGS_FD"
HOLDINGS_FD = 4
#: The longest line read from another process (its events are cut at RELAY_LINE_LIMIT already).
MAX_LINE = 2 * RELAY_LINE_LIMIT


def _family(interface: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in interface else socket.AF_INET


def reuse_port_socket(port: int, interface: str = "", backlog: int = 50) -> socket.socket:
    """A TCP socket listening on ``interface:port`` that other sockets of this user may share
    (``SO_REUSEPORT``); :class:`OSError` if it cannot be bound."""
    sock = socket.socket(_family(interface), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def inherited_holdings() -> tuple[Holdings, int] | None:
    """The :class:`~circles.server.processes.accept.Holdings` the first process gave this one and
    this one's number in it, if any (only in one of the others of a ``--processes``)."""
    member = member_from_environment()
    if member is None:
        return None
    try:
        return Holdings(int(os.environ[ENV_HOLDINGS_FD]), member[1]), member[0]
    except (KeyError, ValueError, OSError):
        return None


def inherited_listen_fd() -> int | None:
    """The descriptor of the listening socket the first process gave this one, if any (only in
    one of the others of a ``--processes``: a stray variable elsewhere names nothing)."""
    if member_from_environment() is None:
        return None
    try:
        return int(os.environ[ENV_LISTEN_FD])
    except (KeyError, ValueError):
        return None


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """TCP (optionally TLS) on a port that other processes bind too (``SO_REUSEPORT``), or, with
    ``fd``, on the listening socket the first process of ``--processes`` gave this one (which
    then accepts as :mod:`circles.server.processes.accept` says)."""

    def __init__(self, reactor, port: int, interface: str = "", backlog: int = 50, tls=None,
                 fd: int | None = None) -> None:
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog
        self._tls = tls
        self._fd = fd

    def listen(self, factory) -> Deferred:
        sock = None
        try:
            if self._fd is None:
                sock = reuse_port_socket(self._port, self._interface, self._backlog)
                fd, family = sock.fileno(), sock.family
            else:
                fd, family = self._fd, _family(self._interface)  # the first process's, listening
            os.set_blocking(fd, False)
            if self._tls is not None:
                factory = tls_factory(self._reactor, self._tls, factory)
            port = SharedPort._fromListeningDescriptor(self._reactor, fd, family, factory)
            port.startListening()
            if self._fd is not None:
                shared = inherited_holdings()
                if shared is not None:
                    port.share(*shared)
        except OSError as e:
            return fail(CannotListenError(self._interface, self._port, e))
        finally:
            if sock is not None:
                sock.close()  # the reactor holds its own descriptor
        if self._fd is not None:
            os.close(self._fd)  # likewise
            self._fd = None
        return succeed(port)


def member_from_environment() -> tuple[int, int, str, int] | None:
    """(number, N, directory, generation) if this process is one of the others of a first
    process's ``--processes``, else None."""
    try:
        number, count = int(os.environ[ENV_PROCESS]), int(os.environ[ENV_PROCESSES])
        directory = os.environ[ENV_DIRECTORY]
        generation = int(os.environ.get(ENV_GENERATION, "1"))
    except (KeyError, ValueError):
        return None
    return number, count, directory, generation


class _Lines:
    """Whole lines from a stream of bytes, each at most ``limit`` bytes: a longer one is dropped
    (its first bytes kept for a note), never accumulated."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = b""
        self._dropping = 0  # bytes of a line too long, so far

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """The lines ``data`` completes, each as (line, 0) or, for one too long, (its first
        bytes, its length)."""
        out = []
        while data:
            end = data.find(b"\n")
            piece, data = (data, b"") if end < 0 else (data[:end], data[end + 1:])
            if self._dropping:
                self._dropping += len(piece)
            elif len(self._buffer) + len(piece) > self._limit:
                self._dropping = len(self._buffer) + len(piece)
                self._buffer = (self._buffer + piece[:200])[:200]
            else:
                self._buffer += piece
            if end >= 0:
                out.append((self._buffer, self._dropping))
                self._buffer, self._dropping = b"", 0
        return out

    def rest(self) -> list[tuple[bytes, int]]:
        """What is left without a newline, once the stream ended."""
        rest = [(self._buffer, self._dropping)] if self._buffer or self._dropping else []
        self._buffer, self._dropping = b"", 0
        return rest


class _Child(ProcessProtocol):
    """One other server process: relays its log lines (stdout: events; stderr: text) and tells
    when it ended."""
    transport: IProcessTransport  # set before any callback

    def __init__(self, number: int, clock) -> None:
        self.number = number  # 2..N: the same for a process started again in its place
        self._clock = clock
        self.ended = Once()  # how it ended, as a log line says it
        self._lines = {1: _Lines(MAX_LINE), 2: _Lines(MAX_LINE)}
        self.pid = 0  # its pid (set as it starts), kept: Twisted clears transport.pid once it ended

    def makeConnection(self, transport) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        for line, length in self._lines[fd].feed(data):
            self._relay(fd, line, length)

    def childConnectionLost(self, fd: int) -> None:
        if fd in self._lines:
            for line, length in self._lines[fd].rest():
                self._relay(fd, line, length)

    def _relay(self, fd: int, line: bytes, length: int) -> None:
        text = line.decode("utf-8", "replace")
        event = relayed_event(text) if fd == 1 and not length else None
        if event is None:
            if not text.strip() and not length:
                return
            event = {"log_namespace": "circles.server.processes.group", "log_time": self._clock.seconds(), "text": text}
            if length:
                event.update(log_format="a line of {length} bytes dropped (at most {limit}); it began {text!r}",
                             log_level=LogLevel.warn, length=length, limit=MAX_LINE)
            else:
                event.update(log_format="{text}", log_level=LogLevel.warn if fd == 2 else LogLevel.info)
        # Its last lines may be read after it ended (Twisted has cleared transport.pid by then).
        globalLogPublisher(tag(event, self.pid, self.number))

    def processEnded(self, reason) -> None:
        self.ended.fire(how_it_ended(reason))


class ServerProcesses(Service):
    """Starts ``count`` more server processes once this one listens, starts again any that exits
    while this one serves, and stops them with it.

    ``argv`` is the plugin's command line for them (``--processes=1``: they never spawn), completed
    with ``--port`` (the port this process bound, in case it was 0) and ``--reuse-port``;
    ``directory`` is the private directory of :mod:`circles.server.processes.siblings`.
    """

    def __init__(self, reactor, count: int, argv: list, listening, stop_timeout: float, directory: str,
                 backlog: int = 50) -> None:
        self._reactor = reactor
        self._count = count
        self._argv = argv
        self._listening = listening  # () -> Deferred[list of IListeningPort]
        self._stop_timeout = stop_timeout
        self._directory = directory
        self.children: list = []
        self._command: list | None = None
        self._delays: dict[int, RestartDelay] = {}
        self._generations: dict[int, int] = {}  # number -> how many processes were started in its place
        self._restarts: dict = {}  # number -> the pending callLater starting it again
        self._backlog = backlog  # unused: the others share the first process's socket, and its backlog
        self._socket: socket.socket | None = None  # the listening socket, kept for the others' restarts
        self.holdings: Holdings | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # This process has bound its port already (it is first in the service tree): bind the
        # others' now, while this process may (a port under 1024, before twistd's --uid).
        self._listening().addCallback(self._bind_theirs)

    def _bind_theirs(self, ports: list) -> None:
        if self._socket is not None:
            return
        # Ours, kept (a descriptor of its own) for as long as others may start.
        self._socket = socket.socket(fileno=os.dup(ports[0].fileno()))
        self.holdings = Holdings.create(self._count + 1)
        if isinstance(ports[0], SharedPort):
            ports[0].share(self.holdings, 1)

    def startService(self) -> None:
        super().startService()
        self._listening().addCallback(self._spawn)

    def _spawn(self, ports: list) -> None:
        if not self.running:
            return
        self._bind_theirs(ports)  # embedded: startService alone
        port = ports[0].getHost().port
        self._command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon",
                         "--pidfile=", "--logger=circles.common.logs.relay_observer",  # to us: see the module's docstring
                         "circles", *self._argv, "--port", str(port), "--reuse-port"]
        for number in range(2, self._count + 2):
            self._delays[number] = RestartDelay(self._reactor)
            self._start(number)

    def _start(self, number: int) -> None:
        again = self._restarts.pop(number, None) is not None
        if not self.running:
            return
        child = _Child(number, self._reactor)
        command, shared, holdings = self._command, self._socket, self.holdings
        assert command is not None and shared is not None and holdings is not None  # made by startService
        generation = self._generations[number] = self._generations.get(number, 0) + 1
        env = dict(os.environ, **{ENV_PROCESS: str(number), ENV_PROCESSES: str(self._count + 1),
                                  ENV_DIRECTORY: self._directory, ENV_LISTEN_FD: str(LISTEN_FD),
                                  ENV_HOLDINGS_FD: str(HOLDINGS_FD), ENV_GENERATION: str(generation)})
        # Its standard output and error are pipes to us (its log). It leads a session of its own:
        # a terminal's Ctrl-C reaches only us, and we stop it with one SIGTERM (two stop signals
        # make a twistd log ReactorNotRunning with a traceback).
        transport = self._reactor.spawnProcess(child, command[0], dies_with_this_process(command, own_session=True),
                                               env=env, childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: shared.fileno(),
                                                                  HOLDINGS_FD: holdings.fd})
        child.ended.when().addCallback(self._ended, child)
        self.children.append(child)
        self._delays[number].started()
        log.info("started server process {n}{again} (pid {child_pid}) on port {port}", n=number,
                 again=" again" if again else "", child_pid=transport.pid, port=command[-2])

    def _ended(self, how: str, child: _Child) -> None:
        if child in self.children:
            self.children.remove(child)
            if self.running:
                if self.holdings is not None:  # not accepting: nobody leaves connections to it
                    self.holdings.set(child.number, ABSENT)
                delay = self._delays[child.number].after_exit()
                log.error("server process {n} exited ({how}) while serving; starting it again in {delay:g}s",
                          n=child.number, how=how, delay=delay)
                self._restarts[child.number] = self._reactor.callLater(delay, self._start, child.number)

    def stopService(self) -> Deferred:
        super().stopService()
        restarts, self._restarts = self._restarts, {}
        for call in restarts.values():
            call.cancel()
        children, self.children = list(self.children), []
        if self._socket is not None:
            self._socket.close()  # the others hold their own descriptors
            self._socket = None
        # Each drains its own connections on SIGTERM; one still there after the grace is killed.
        return DeferredList([ensureDeferred(terminate(self._reactor, child.transport, child.ended, self._stop_timeout))
                             for child in children], consumeErrors=True)
