"""Child processes: tied to their parent, stopped with SIGTERM then SIGKILL, restarted with a delay.

Here real child processes; on a Clock with a fake transport in tests/unit/test_children.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import ProcessProtocol

from circles.common.children import dies_with_this_process, how_it_ended, terminate
from circles.common.once import Once

from ..support import alive

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


def running(pid: int, program: str) -> bool:
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().startswith(program + "\0")


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"{pid} still runs"
        time.sleep(0.02)


# -- dies_with_this_process ----------------------------------------------------------------------

#: A parent that starts ``argv`` as dies_with_this_process(argv, **options) wraps it, prints the
#: child's pid and waits; the test then kills it with SIGKILL.
PARENT = """
import json, subprocess, sys
from circles.common.children import dies_with_this_process
child = subprocess.Popen(dies_with_this_process(json.loads(sys.argv[1]), **json.loads(sys.argv[2])))
print(child.pid, flush=True)
child.wait()
"""


def start_parent(argv: list, **options) -> tuple[subprocess.Popen, int]:
    import json
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(argv), json.dumps(options)],
                              stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


@linux_only
@pytest.mark.parametrize("options", [{}, {"own_session": True}, {"supervise": True}])
def test_the_child_dies_with_its_parent(options):
    parent, child = start_parent(["/bin/sleep", "300"], **options)
    try:
        deadline = time.monotonic() + 30
        # Set up: the program runs (or, supervised, the supervisor leads its session).
        while not (os.getsid(child) == child if options else running(child, "/bin/sleep")):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert alive(child)
        assert (os.getsid(child) == child) == bool(options)  # a session (and group) of its own, if asked
    finally:
        parent.kill()
        parent.wait()
    wait_gone(child)


@linux_only
def test_a_supervised_child_takes_what_it_started_with_it(tmp_path):
    pidfile = tmp_path / "pid"
    parent, supervisor = start_parent(["/bin/sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], supervise=True)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        background = int(pidfile.read_text())
        assert os.getpgid(background) == supervisor  # the group's id is the pid the parent sees
    finally:
        parent.kill()
        parent.wait()
    wait_gone(background)
    wait_gone(supervisor)


def test_a_supervised_child_exits_as_its_program_did():
    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(dies_with_this_process(["/bin/sh", "-c", script], supervise=True),
                              capture_output=True, text=True, timeout=60)

    assert run("echo out; exit 3").returncode == 3
    assert run("echo out").stdout == "out\n"
    assert run("kill -TERM $$").returncode == -signal.SIGTERM
    assert run("kill -KILL $$").returncode == -signal.SIGKILL


@pytest.mark.parametrize("options", [{}, {"own_session": True}, {"supervise": True}])
def test_a_program_that_cannot_start_is_one_line(tmp_path, options):
    missing = str(tmp_path / "missing")
    result = subprocess.run(dies_with_this_process([missing], **options), capture_output=True, text=True, timeout=60)
    if result.args == [missing]:
        pytest.skip("no wrapper on this platform")
    assert result.returncode == 1
    assert result.stderr == f"cannot start {missing}: No such file or directory"


@linux_only
@pytest.mark.parametrize("options", [{}, {"supervise": True}, {"supervise": True, "limits": {"cpu": 60}}])
def test_batch_runs_the_program_and_what_it_starts_under_sched_batch(options):
    """Engine children and --exec scripts: woken, they do not preempt the worker."""
    program = [sys.executable, "-c", "import os, subprocess, sys; print(os.sched_getscheduler(0)); "
               "sys.stdout.flush(); subprocess.run([sys.executable, '-c', 'import os; print(os.sched_getscheduler(0))'])"]
    batch = subprocess.run(dies_with_this_process(program, batch=True, **options), capture_output=True, text=True,
                           timeout=60)
    assert batch.stdout.split() == [str(os.SCHED_BATCH)] * 2, batch.stderr
    plain = subprocess.run(dies_with_this_process(program, **options), capture_output=True, text=True, timeout=60)
    assert plain.stdout.split() == [str(os.sched_getscheduler(0))] * 2, plain.stderr
    assert os.sched_getscheduler(0) != os.SCHED_BATCH


@linux_only
@pytest.mark.parametrize("options, status", [({}, 1), ({"own_session": True}, 1), ({"supervise": True}, -9)])
def test_a_child_whose_parent_is_gone_already_does_not_run(tmp_path, options, status):
    """The parent died between the fork and the request for the signal: the child sees it has
    another parent, and goes instead of running on, orphaned."""
    marker = tmp_path / "ran"
    argv = dies_with_this_process(["/bin/sh", "-c", f"touch {marker}"], **options)
    argv[argv.index(str(os.getpid()))] = str(os.getpid() + 1_000_000)  # the parent it expects: not ours
    assert subprocess.run(argv, timeout=60).returncode == status
    assert not marker.exists()


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.ended = Once()
        self.ready = Once()

    def outReceived(self, data: bytes) -> None:
        if not self.ready.fired:
            self.ready.fire(None)

    def processEnded(self, reason) -> None:
        self.ended.fire(how_it_ended(reason))


@pytest_twisted.ensureDeferred
async def test_terminate_a_real_process_that_ignores_sigterm():
    """The real thing: a program that ignores SIGTERM is killed once the grace has passed."""
    child = _Child()
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
              "time.sleep(60)")
    transport = reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", script], env=None)
    await child.ready.when()
    started = time.monotonic()
    assert await terminate(reactor, transport, child.ended, 0.5) == "killed by signal 9"
    assert 0.4 < time.monotonic() - started < 30
