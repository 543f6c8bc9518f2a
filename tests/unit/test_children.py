"""Child processes: tied to their parent, stopped with SIGTERM then SIGKILL, restarted with a delay.

Here on a Clock with a fake transport; real child processes in tests/integration/test_children.py."""

from __future__ import annotations

import sys

from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from circles.common.children import RestartDelay, dies_with_this_process, how_it_ended, terminate
from circles.common.once import Once


def test_elsewhere_than_linux_only_the_session_options_wrap(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert dies_with_this_process(["/bin/true"]) == ["/bin/true"]
    wrapped = dies_with_this_process(["/bin/true"], own_session=True)
    assert wrapped[-2:] == ["session", "/bin/true"]
    assert dies_with_this_process(["/bin/true"], supervise=True)[-2:] == ["session,supervise", "/bin/true"]


# -- terminate ------------------------------------------------------------------------------------

class FakeTransport:
    def __init__(self, exited: bool = False) -> None:
        self.signals: list = []
        self.exited = exited

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)


def outcome(d) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_terminate_sends_sigterm_and_returns_once_ended():
    clock, transport, ended = Clock(), FakeTransport(), Once()
    result = outcome(ensureDeferred(terminate(clock, transport, ended, 10)))
    assert transport.signals == ["TERM"] and result == []
    clock.advance(9)
    ended.fire("exit status 0")
    assert result == ["exit status 0"]
    assert clock.getDelayedCalls() == []  # no SIGKILL left pending
    clock.advance(10)
    assert transport.signals == ["TERM"]


def test_terminate_sends_sigkill_after_the_grace():
    clock, transport, ended = Clock(), FakeTransport(), Once()
    result = outcome(ensureDeferred(terminate(clock, transport, ended, 10)))
    clock.advance(10)
    assert transport.signals == ["TERM", "KILL"] and result == []
    ended.fire("killed by signal 9")
    assert result == ["killed by signal 9"]


def test_terminate_an_ended_process_signals_nothing():
    clock, transport, ended = Clock(), FakeTransport(), Once()
    ended.fire(0)
    assert outcome(ensureDeferred(terminate(clock, transport, ended, 10))) == [0]
    assert transport.signals == [] and clock.getDelayedCalls() == []


def test_terminate_a_process_exiting_meanwhile_is_no_error():
    clock, transport, ended = Clock(), FakeTransport(exited=True), Once()
    result = outcome(ensureDeferred(terminate(clock, transport, ended, 10)))
    clock.advance(10)
    ended.fire(0)
    assert result == [0]


def test_how_it_ended():
    assert how_it_ended(Failure(ProcessDone(0))) == "exit status 0"
    assert how_it_ended(Failure(ProcessTerminated(exitCode=3))) == "exit status 3"
    assert how_it_ended(Failure(ProcessTerminated(signal=9))) == "killed by signal 9"


# -- RestartDelay -----------------------------------------------------------------------------------

def test_restart_delay_backs_off_for_quick_exits_and_resets_after_a_stable_run():
    clock = Clock()
    delay = RestartDelay(clock, first=1.0, most=8.0, stable=60.0)
    seen = []
    for _ in range(5):  # a process that exits as soon as it starts
        seen.append(delay.after_exit())
        clock.advance(seen[-1])
        delay.started()
    assert seen == [1.0, 2.0, 4.0, 8.0, 8.0]
    clock.advance(60)  # this one served a minute: killed now, it is back at once
    assert delay.after_exit() == 1.0
