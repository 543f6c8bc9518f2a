"""circles.common.event_loop: Twisted's epoll loop with each event served by a direct call, on
real epoll reactors (each test its own, not the suite's) over real socket pairs. What a
descriptor's code sees, and what the legacy log says, must be what Twisted's own loop gives."""

from __future__ import annotations

import socket
import threading

from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.pollreactor import PollReactor
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
        for descriptor in descriptors:
            reactor.removeReader(descriptor)
            descriptor.socket.close()
            descriptor.peer.close()
        reactor._poller.close()
        reactor.waker.connectionLost(None)
    return sorted(events), {d.name: d.lost for d in descriptors}


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
    try:
        iteration = reactor.doIteration
        assert not event_loop.serve_events_directly(reactor)
        assert reactor.doIteration == iteration
        assert type(context.defaultContextDict[log.ILogContext]) is dict
    finally:
        reactor.waker.connectionLost(None)
