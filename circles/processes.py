"""Several server processes on one port, so one host serves with all its cores.

``--processes N`` makes the process twistd started the first of N. Each binds the same port
with ``SO_REUSEPORT`` and the kernel spreads new connections across them; they share nothing
but Redis (each has its own script runner and reply list, as separate hosts would). The first
process starts the private Redis, if any, and the N-1 others with the same options pointed at
it; they die with it (parent-death signal) and stop when it stops. One that exits while
serving is started again (see :class:`~circles.children.RestartDelay`), so N stay N.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from circles.children import RestartDelay, dies_with_this_process, how_it_ended, terminate
from circles.logs import Logger, twistd_logger_options
from circles.once import Once

log = Logger()


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """TCP (optionally TLS) on a port that other processes bind too (``SO_REUSEPORT``)."""

    def __init__(self, reactor, port: int, interface: str = "", backlog: int = 50, tls=None) -> None:
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog
        self._tls = tls

    def listen(self, factory) -> Deferred:
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            if self._tls is not None:
                factory = TLSMemoryBIOFactory(self._tls, False, factory)
            port = self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            return fail(CannotListenError(self._interface, self._port, e))
        finally:
            sock.close()  # the reactor holds its own descriptor
        return succeed(port)


class _Child(ProcessProtocol):
    def __init__(self, number: int) -> None:
        self.number = number  # 1..count: the same for a process started again in its place
        self.ended = Once()  # how it ended, as a log line says it

    def processEnded(self, reason) -> None:
        self.ended.fire(how_it_ended(reason))


class ServerProcesses(Service):
    """Starts ``count`` more server processes once this one listens, starts again any that exits
    while this one serves, and stops them with it.

    ``argv`` is the plugin's command line for them (``--processes=1``: they never spawn), completed
    with ``--port`` (the port this process bound, in case it was 0) and ``--reuse-port``.
    """

    def __init__(self, reactor, count: int, argv: list, listening, stop_timeout: float) -> None:
        self._reactor = reactor
        self._count = count
        self._argv = argv
        self._listening = listening  # () -> Deferred[list of IListeningPort]
        self._stop_timeout = stop_timeout
        self.children: list = []
        self._command: Optional[list] = None
        self._delays: "dict[int, RestartDelay]" = {}
        self._restarts: dict = {}  # number -> the pending callLater starting it again

    def startService(self) -> None:
        super().startService()
        self._listening().addCallback(self._spawn)

    def _spawn(self, ports: list) -> None:
        if not self.running:
            return
        port = ports[0].getHost().port
        self._command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon",
                         "--pidfile=", "--logfile=-", *twistd_logger_options(),  # JSON lines if ours are
                         "circles", *self._argv, "--port", str(port), "--reuse-port"]
        for number in range(1, self._count + 1):
            self._delays[number] = RestartDelay(self._reactor)
            self._start(number)

    def _start(self, number: int) -> None:
        self._restarts.pop(number, None)
        if not self.running:
            return
        child = _Child(number)
        command = self._command
        # The children's logs go where ours go: the same standard output and error. Each leads a
        # session of its own: a terminal's Ctrl-C reaches only us, and we stop them with one SIGTERM
        # (two stop signals make a twistd log ReactorNotRunning with a traceback).
        transport = self._reactor.spawnProcess(child, command[0], dies_with_this_process(command, own_session=True),
                                               env=dict(os.environ), childFDs={0: "w", 1: 1, 2: 2})
        child.transport = transport
        child.ended.when().addCallback(self._ended, child)
        self.children.append(child)
        self._delays[number].started()
        log.info("started server process {n} (pid {pid}) on port {port}", n=number + 1,
                 pid=transport.pid, port=command[-2])

    def _ended(self, how: str, child: _Child) -> None:
        if child in self.children:
            self.children.remove(child)
            if self.running:
                delay = self._delays[child.number].after_exit()
                log.error("server process {n} exited ({how}) while serving; starting it again in {delay:g}s",
                          n=child.number + 1, how=how, delay=delay)
                self._restarts[child.number] = self._reactor.callLater(delay, self._start, child.number)

    def stopService(self) -> Deferred:
        super().stopService()
        restarts, self._restarts = self._restarts, {}
        for call in restarts.values():
            call.cancel()
        children, self.children = list(self.children), []
        # Each drains its own connections on SIGTERM; one still there after the grace is killed.
        return DeferredList([ensureDeferred(terminate(self._reactor, child.transport, child.ended, self._stop_timeout))
                             for child in children], consumeErrors=True)
