"""Child processes that do not outlive us: how they start, stop and start again.

Shared by whatever spawns a program: the server's other processes (``--processes``), its
private ``redis-server``, the worker's ``--exec`` scripts and the try-out's server and worker.
Nothing here belongs to the server or the worker, so both may load it.

- :func:`dies_with_this_process` wraps a command line so the kernel ends the child should we
  die (``PR_SET_PDEATHSIG``), optionally in a session of its own, or under a supervisor that
  ends everything the program started.
- :func:`terminate` stops a child: SIGTERM, then SIGKILL once a grace period has passed.
- :class:`RestartDelay` spaces the restarts of a child that keeps exiting.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.interfaces import IProcessTransport, IReactorTime
from twisted.python.failure import Failure

from circles.common.once import Once

# Runs in the child before the program, as ``python -I -S -c _SHIM <our pid> <options> argv...``
# (-I -S: start as fast as Python can). Options, comma-separated:
#   session    lead a new session (so a process group of its own; a terminal's Ctrl-C is ours)
#   pdeathsig  ask the kernel for SIGTERM when we die (Linux; it survives exec)
#   supervise  stay as the program's parent: on SIGTERM (ours, or the kernel's when we die),
#              SIGKILL the whole group, what the program started too; exit as the program did
#   as=N       the program's RLIMIT_AS (soft and hard): at most N bytes of address space
#   cpu=N      the program's RLIMIT_CPU: SIGXCPU after N seconds of CPU, SIGKILL one later
#   batch      the program runs under SCHED_BATCH (Linux; where it cannot, as it was)
# If we died before the request was made, the child goes at once. A program that cannot be
# started is one line on stderr and exit status 1.
_SHIM = """\
import os, signal, sys
parent, options, argv = int(sys.argv[1]), sys.argv[2].split(','), sys.argv[3:]
supervise = 'supervise' in options
limits = [option.split('=') for option in options if '=' in option]
def end_group(*_): os.killpg(0, signal.SIGKILL)
def limit():
    import resource
    for name, value in limits:
        which, soft = {'as': resource.RLIMIT_AS, 'cpu': resource.RLIMIT_CPU}[name], int(value)
        hard = soft + 1 if name == 'cpu' else soft
        old = resource.getrlimit(which)[1]
        if old != resource.RLIM_INFINITY: soft, hard = min(soft, old), min(hard, old)
        resource.setrlimit(which, (soft, hard))
def start():
    if limits: limit()
    if 'batch' in options:
        try: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError): pass
    try: os.execv(argv[0], argv)
    except OSError as e: os.write(2, f'cannot start {argv[0]}: {e.strerror}'.encode()); os._exit(1)
if 'session' in options: os.setsid()
if supervise: signal.signal(signal.SIGTERM, end_group)
if 'pdeathsig' in options:
    import ctypes; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != parent:
    end_group() if supervise else sys.exit(1)
if not supervise: start()
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    start()
status = os.waitpid(pid, 0)[1]
if os.WIFSIGNALED(status):
    if os.WTERMSIG(status) != signal.SIGKILL: signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
os._exit(os.waitstatus_to_exitcode(status))
"""


def dies_with_this_process(argv: list, *, own_session: bool = False, supervise: bool = False,
                           limits: dict | None = None, batch: bool = False) -> list:
    """``argv`` (``argv[0]`` a path) wrapped so the child is terminated if this process dies
    (Linux; elsewhere only the other options apply, and with none ``argv`` is unchanged).

    :param own_session: the child leads a new session and process group.
    :param supervise: implies ``own_session``; a small supervisor stays the program's parent and
        kills the whole group on SIGTERM or our death, so nothing the program started in the
        background survives it. It exits with the program's status (or signal); the group's
        id is the pid the caller sees.
    :param limits: resource limits of the program (not of its supervisor), inherited by what it
        starts: ``{"as": bytes}`` (RLIMIT_AS, its address space) and ``{"cpu": seconds}``
        (RLIMIT_CPU: SIGXCPU then, SIGKILL a second later); None or 0 for no limit. Only
        lowered: a limit the worker has already that is lower stays.
    :param batch: the program (and what it starts) runs under ``SCHED_BATCH`` (Linux): the same
        share of the CPU, but woken it does not preempt the process running, the worker that
        is still handing out work (a script's child, woken by each frame, took the CPU from the
        worker between two frames). No privilege needed; where it is refused, the program runs
        as it was.
    """
    options = []
    if own_session or supervise:
        options.append("session")
    if sys.platform.startswith("linux"):
        options.append("pdeathsig")
    if supervise:
        options.append("supervise")
    if batch and sys.platform.startswith("linux"):
        options.append("batch")
    for name, value in sorted((limits or {}).items()):
        if name not in ("as", "cpu"):
            raise ValueError(f"unknown limit {name!r}")
        if value:
            options.append(f"{name}={int(value)}")
    if not options:
        return argv
    return [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), ",".join(options)] + list(argv)


async def terminate(reactor: IReactorTime, transport: IProcessTransport, ended: Once, grace: float) -> Any:
    """SIGTERM the process behind ``transport``, and SIGKILL it if it has not ended ``grace``
    seconds later; return ``ended``'s result once it has ended (at once if it had already)."""
    if not ended.fired:
        _signal(transport, "TERM")
        timer = reactor.callLater(grace, _signal, transport, "KILL")
        try:
            return await ended.when()
        finally:
            if timer.active():
                timer.cancel()
    return await ended.when()


def _signal(transport: IProcessTransport, name: str) -> None:
    try:
        transport.signalProcess(name)
    except Exception:
        pass  # it exited already


def how_it_ended(reason: Failure) -> str:
    """A ``processEnded`` reason as a log or error line says it."""
    value: Any = reason.value  # ProcessDone or ProcessTerminated
    code, signal = value.exitCode, value.signal
    return f"exit status {code}" if code is not None else f"killed by signal {signal}"


class RestartDelay:
    """Seconds to wait before starting again a process that exited on its own (a server process,
    the private redis-server): ``first``, doubled after each exit that came less than ``stable``
    seconds after its start, at most ``most``; back to ``first`` once one ran ``stable`` seconds.
    So a process killed once is back at once, and one that cannot run is retried ever more rarely.
    Time is the given clock's (the reactor's)."""

    def __init__(self, clock: IReactorTime, first: float = 1.0, most: float = 60.0, stable: float = 60.0) -> None:
        self._clock = clock
        self.first = first
        self.most = most
        self.stable = stable
        self._next = first
        self._started = clock.seconds()

    def started(self) -> None:
        """The process was (re)started now."""
        self._started = self._clock.seconds()

    def after_exit(self) -> float:
        """It exited now: the seconds to wait before starting it again."""
        if self._clock.seconds() - self._started >= self.stable:
            self._next = self.first
        delay, self._next = self._next, min(self._next * 2, self.most)
        return delay
