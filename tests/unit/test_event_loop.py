"""circles.common.event_loop: Twisted's epoll loop with each event served by a direct call, on
real epoll reactors (each test its own, not the suite's) over real socket pairs. What a
descriptor's code sees, and what the legacy log says, must be what Twisted's own loop gives."""

from __future__ import annotations

import socket
import threading

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.pollreactor import PollReactor
from twisted.logger import globalLogPublisher
from twisted.python import context, log

from circles.common import event_loop


class Descriptor(FileDescriptor):
    """One end of a socket pair, read by ``on_read(self)``; its log prefix names it."""

    def __init__(self, reactor, name: str, on_read) -> None:
        super().__init__(reactor)
        self.name = name
        self.on_read = on_read
        self.socket, self.peer = socket.socketpair()
        self.socket.setblocking(False)
        self.lost = []

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self):
        self.socket.recv(100)
        return self.on_read(self)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason.type)
        self.reactor.removeReader(self)
        if self.name == "loses-badly":
            raise RuntimeError("connectionLost failed")

    def close(self) -> None:
        self.socket.close()
        self.peer.close()


def legacy_message(message: str) -> None:
    log.msg(message)


def logged_from_a_thread(descriptor: Descriptor) -> None:
    thread = threading.Thread(target=log.msg, args=("from a thread",))
    thread.start()
    thread.join()


def raises(descriptor: Descriptor) -> None:
    raise ValueError("doRead failed")


def disconnects(descriptor: Descriptor):
    return ValueError("disconnect me")  # a reason: _doReadOrWrite disconnects, connectionLost raises


@pytest.fixture
def root_context():
    """The root log context as it was: serve_events_directly changes it for the process."""
    saved = context.defaultContextDict[log.ILogContext]
    yield
    context.defaultContextDict[log.ILogContext] = saved


def one_iteration(direct: bool) -> tuple[list, dict]:
    """Four descriptors ready at once on a new epoll reactor, served by one iteration of its loop
    (Twisted's or the direct one); then a message outside any. The legacy events seen, as
    (system, message or error), and how each descriptor ended."""
    reactor = EPollReactor()
    if direct:
        assert event_loop.serve_events_directly(reactor)
    descriptors = [Descriptor(reactor, "says-hello,1,127.0.0.1", lambda d: legacy_message("hello")),
                   Descriptor(reactor, "raises", raises),
                   Descriptor(reactor, "loses-badly", disconnects),
                   Descriptor(reactor, "threaded", logged_from_a_thread)]
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
        for descriptor in descriptors:
            reactor.removeReader(descriptor)
            descriptor.close()
        reactor._poller.close()
        reactor.waker.connectionLost(None)
    return sorted(events), {d.name: [t.__name__ for t in d.lost] for d in descriptors}


def test_the_direct_loop_serves_and_logs_as_twisteds_own(root_context):
    """Each descriptor's legacy events name it (as callWithLogger's context did), an exception
    out of doRead disconnects its descriptor only, one out of the disconnection is logged with
    its descriptor's name and the other descriptors are still served; a thread's event and an
    event outside every descriptor say ``-``."""
    direct = one_iteration(direct=True)
    assert direct == one_iteration(direct=False)
    events, lost = direct
    assert events == [("-", "after"), ("-", "from a thread"), ("loses-badly", "connectionLost failed"),
                      ("raises", "doRead failed"), ("says-hello,1,127.0.0.1", "hello")]
    assert lost == {"says-hello,1,127.0.0.1": [], "raises": ["ValueError"], "loses-badly": ["ValueError"],
                    "threaded": []}


def test_a_buggy_log_prefix_is_named_as_twisted_names_it(root_context):
    class Buggy(Descriptor):
        def logPrefix(self) -> str:
            raise KeyError("no prefix")

    reactor = EPollReactor()
    assert event_loop.serve_events_directly(reactor)
    descriptor = Buggy(reactor, "buggy", lambda d: legacy_message("hello"))
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor.addReader(descriptor)
        descriptor.peer.send(b"x")
        reactor.doIteration(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
        reactor.removeReader(descriptor)
        descriptor.close()
        reactor._poller.close()
        reactor.waker.connectionLost(None)
    [hello] = [e for e in events if e.get("message") == ("hello",)]
    assert hello["log_system"] == "(buggy logPrefix method)"


def test_only_the_epoll_reactor_is_changed(root_context):
    reactor = PollReactor()
    try:
        iteration = reactor.doIteration
        assert not event_loop.serve_events_directly(reactor)
        assert reactor.doIteration == iteration
        assert type(context.defaultContextDict[log.ILogContext]) is dict
    finally:
        reactor.waker.connectionLost(None)
