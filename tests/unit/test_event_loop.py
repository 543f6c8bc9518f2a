"""circles.common.event_loop: Twisted's epoll loop with each event served by a direct call, on
real epoll reactors (each test its own, not the suite's) over real socket pairs. What a
descriptor's code sees, and what the legacy log says, must be what Twisted's own loop gives."""

from __future__ import annotations

import socket
import threading

import pytest_twisted
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.pollreactor import PollReactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import context, log

from circles.common import event_loop


class Descriptor(FileDescriptor):
    """One end of a socket pair, read by ``on_read(self)``; its log prefix is its name (None: a
    ``logPrefix`` that raises)."""

    def __init__(self, reactor, name: str | None, on_read) -> None:
        super().__init__(reactor)
        self.name = name
        self.on_read = on_read
        self.socket, self.peer = socket.socketpair()
        self.socket.setblocking(False)
        self.lost = []

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        if self.name is None:
            raise KeyError("no prefix")
        return self.name

    def doRead(self):
        self.socket.recv(100)
        return self.on_read(self)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason.type.__name__)
        self.reactor.removeReader(self)
        if self.name == "loses-badly":
            raise RuntimeError("connectionLost failed")


def says_hello(descriptor: Descriptor) -> None:
    log.msg("hello")


def logs_from_a_thread(descriptor: Descriptor) -> None:
    thread = threading.Thread(target=log.msg, args=("from a thread",))
    thread.start()
    thread.join()


def raises(descriptor: Descriptor) -> None:
    raise ValueError("doRead failed")


def disconnects(descriptor: Descriptor):
    return ValueError("disconnect me")  # a reason: _doReadOrWrite disconnects, connectionLost raises


def served_at_once(direct: bool, *reads) -> tuple[list, dict]:
    """Descriptors, ``(name, on_read)`` each, ready at once on a new epoll reactor and served by
    one iteration of its loop (Twisted's or the direct one); then a legacy message outside any.
    The legacy events logged, as (system, message or error), and how each descriptor ended. The
    root log context is Twisted's again afterwards (serve_events_directly changes it)."""
    root = context.defaultContextDict[log.ILogContext]
    reactor = EPollReactor()
    if direct:
        assert event_loop.serve_events_directly(reactor)
    descriptors = [Descriptor(reactor, name, on_read) for name, on_read in reads]
    events: list = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "log_legacy":
            failure = event.get("log_failure") or event.get("failure")
            said = failure.value.args[0] if failure is not None else " ".join(event["message"])
            events.append((event.get("log_system"), said))

    globalLogPublisher.addObserver(observe)
    try:
        for descriptor in descriptors:
            reactor.addReader(descriptor)
            descriptor.peer.send(b"x")
        reactor.doIteration(1)
        log.msg("after")
    finally:
        globalLogPublisher.removeObserver(observe)
        context.defaultContextDict[log.ILogContext] = root
        close(reactor, *descriptors)
    return sorted(events), {d.name: d.lost for d in descriptors}


def close(reactor: EPollReactor, *descriptors: Descriptor) -> None:
    """Let go of ``reactor``'s epoll, its waker and ``descriptors`` (each reading)."""
    for descriptor in descriptors:
        reactor.removeReader(descriptor)
        descriptor.socket.close()
        descriptor.peer.close()
    reactor._poller.close()
    reactor.waker.connectionLost(None)


def test_the_direct_loop_serves_and_logs_as_twisteds_own():
    """Each descriptor's legacy events name it (as callWithLogger's context did), an exception
    out of doRead disconnects its descriptor only, one out of the disconnection is logged with
    its descriptor's name and the other descriptors are still served; a thread's event and an
    event outside every descriptor say ``-``."""
    reads = [("says-hello,1,127.0.0.1", says_hello), ("raises", raises), ("loses-badly", disconnects),
             ("threaded", logs_from_a_thread)]
    direct = served_at_once(True, *reads)
    assert direct == served_at_once(False, *reads)
    events, lost = direct
    assert events == [("-", "after"), ("-", "from a thread"), ("loses-badly", "connectionLost failed"),
                      ("raises", "doRead failed"), ("says-hello,1,127.0.0.1", "hello")]
    assert lost == {"says-hello,1,127.0.0.1": [], "raises": ["ValueError"], "loses-badly": ["ValueError"],
                    "threaded": []}


def test_a_buggy_log_prefix_is_named_as_twisted_names_it():
    """Twisted also logs the prefix's own exception before every call of the descriptor; the
    direct loop asks for the prefix only when an event is logged, and does not."""
    events, _ = served_at_once(True, (None, says_hello))
    assert events == [("(buggy logPrefix method)", "hello"), ("-", "after")]
    twisteds, _ = served_at_once(False, (None, says_hello))
    assert twisteds == [("(buggy logPrefix method)", "hello"), ("(buggy logPrefix method)", "no prefix"), ("-", "after")]


def test_only_the_epoll_reactor_is_changed():
    reactor = PollReactor()
    root = context.defaultContextDict[log.ILogContext]
    try:
        iteration = reactor.doIteration
        assert not event_loop.serve_events_directly(reactor)
        assert reactor.doIteration == iteration
        assert context.defaultContextDict[log.ILogContext] is root
    finally:
        reactor.waker.connectionLost(None)


# -- the end of a turn ---------------------------------------------------------------------------

def direct_reactor() -> EPollReactor:
    reactor = EPollReactor()
    root = context.defaultContextDict[log.ILogContext]
    try:
        assert event_loop.serve_events_directly(reactor)
    finally:
        context.defaultContextDict[log.ILogContext] = root  # Twisted's again: only the loop is tested here
    return reactor


class WatchedPoller:
    """The reactor's epoll object, the timeout of each of its waits written down."""

    def __init__(self, poller) -> None:
        self._poller = poller
        self.waits: list = []

    def poll(self, timeout, count):
        self.waits.append(timeout)
        return self._poller.poll(timeout, count)

    def __getattr__(self, name: str):
        return getattr(self._poller, name)


def watched(reactor: EPollReactor) -> WatchedPoller:
    reactor._poller = WatchedPoller(reactor._poller)
    return reactor._poller


def test_a_call_for_the_turns_end_runs_after_every_event_of_the_turn_without_a_timer():
    """Each of two descriptors ready at once asks for a call at the turn's end: both run once,
    in the order asked, after both descriptors were served and in the same iteration, with no
    DelayedCall on the reactor's heap; one cancelled does not run."""
    reactor = direct_reactor()
    poller = watched(reactor)
    clock = event_loop.TurnEnd(reactor)
    done: list = []

    def asks(descriptor: Descriptor) -> None:
        done.append(f"served {descriptor.name}")
        clock.callLater(0, done.append, f"end after {descriptor.name}")
        clock.callLater(0, done.append, "cancelled").cancel()
        assert reactor.getDelayedCalls() == []

    descriptors = [Descriptor(reactor, name, asks) for name in ("a", "b")]
    try:
        for descriptor in descriptors:
            reactor.addReader(descriptor)
            descriptor.peer.send(b"x")
        reactor.doIteration(5)
    finally:
        close(reactor, *descriptors)
    assert sorted(done[:2]) == ["served a", "served b"]
    first, second = (name[-1] for name in done[:2])
    assert done[2:] == [f"end after {first}", f"end after {second}"]
    assert poller.waits == [5]


def test_a_call_asked_for_outside_the_events_runs_before_the_next_wait_which_does_not_wait():
    """A timer (or a thread's call) asks for the end of the turn before the loop polls: the
    call runs first and the poll does not block, so what it sent is not held until some event."""
    reactor = direct_reactor()
    poller = watched(reactor)
    clock = event_loop.TurnEnd(reactor)
    done: list = []
    reactor.callLater(0, lambda: clock.callLater(0, done.append, "flushed"))
    try:
        reactor.runUntilCurrent()
        assert done == []
        reactor.doIteration(30)
    finally:
        close(reactor)
    assert done == ["flushed"]
    assert poller.waits == [0]


def test_an_exception_of_one_call_is_logged_and_the_others_still_run():
    reactor = direct_reactor()
    clock = event_loop.TurnEnd(reactor)
    done: list = []
    failures: list = []

    def observe(event: dict) -> None:
        if event.get("isError"):
            failures.append((event["why"], event["failure"].value.args[0]))

    def raises() -> None:
        raise ValueError("flush failed")

    globalLogPublisher.addObserver(observe)
    try:
        clock.callLater(0, raises)
        clock.callLater(0, done.append, "still run")
        reactor.doIteration(0)
    finally:
        globalLogPublisher.removeObserver(observe)
        close(reactor)
    assert done == ["still run"]
    assert failures == [("while handling a call at the end of a turn", "flush failed")]


def test_a_call_for_the_turns_end_is_cancelled_and_reports_its_state_as_a_delayed_call_does():
    import pytest
    from twisted.internet.error import AlreadyCalled, AlreadyCancelled

    reactor = direct_reactor()
    clock = event_loop.TurnEnd(reactor)
    try:
        kept, dropped = clock.callLater(0, lambda: None), clock.callLater(0, lambda: None)
        assert kept.active() and dropped.active() and kept.getTime() <= reactor.seconds()
        dropped.cancel()
        assert not dropped.active()
        with pytest.raises(AlreadyCancelled):
            dropped.cancel()
        reactor.doIteration(0)
        assert not kept.active()
        with pytest.raises(AlreadyCalled):
            kept.cancel()
    finally:
        close(reactor)


def test_without_the_direct_loop_or_with_a_delay_it_is_the_reactors_call_later():
    from twisted.internet.base import DelayedCall

    plain = EPollReactor()
    direct = direct_reactor()
    try:
        later = event_loop.TurnEnd(plain).callLater(0, lambda: None)
        assert type(later) is DelayedCall and plain.getDelayedCalls() == [later]
        timer = event_loop.TurnEnd(direct).callLater(0.5, lambda: None)
        assert type(timer) is DelayedCall and direct.getDelayedCalls() == [timer]
        assert event_loop.TurnEnd(direct).getDelayedCalls() == [timer]
        clock = Clock()  # a test's clock, which has no loop at all
        later = event_loop.TurnEnd(clock).callLater(0, lambda: None)
        assert clock.getDelayedCalls() == [later]
    finally:
        for reactor in (plain, direct):
            for call in reactor.getDelayedCalls():
                call.cancel()
            close(reactor)


@pytest_twisted.ensureDeferred
async def test_the_services_in_process_run_on_the_loop_twistd_gives_them():
    """tests/conftest.py gives the suite's reactor the direct loop, as both plugins give theirs:
    a call for the end of the turn is the loop's, and it runs."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    ran: Deferred = Deferred()
    call = event_loop.TurnEnd(reactor).callLater(0, ran.callback, "ran")
    assert isinstance(call, event_loop.TurnEndCall)
    assert await ran == "ran"
