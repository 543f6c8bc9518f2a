"""One ``/metrics`` and one ``/ready`` for ``--processes N``, whichever process a request reaches.

The N processes share one port (``SO_REUSEPORT``), so a scrape or a probe reaches any one of
them, and each knew only itself: counters went up and down between scrapes, and ``/ready`` said
200 with a process dead. Now the process that gets the request answers for the whole server.

How: a mesh of Unix sockets. Each process listens on one of its own, ``<number>.sock`` in a
private directory (mode 0700: only this user) that the first process makes and gives the others
in their environment (:mod:`circles.server.processes.group`). A question is one line; the answer
is what that process alone would say, then the connection closes: to ``ready``, ``{"problem":
...}`` as JSON; to ``metrics``, its generation (which start in its number's place it is) on a
line, then its exposition.

``/ready``: the process asked by a client asks all the others at once, each within
:data:`ASK_TIMEOUT`, and names the first problem. So none relays for another: a process that died
(its socket refuses, or is gone) or hangs (no answer in time) is simply reported, ``/ready`` 503
naming it, until it answers again (the first process restarts it).

``/metrics``: the first process (:data:`FIRST`) answers for the whole server, and the others ask
it (the question ``whole``). It asks every process for its ``metrics`` as above and merges them
(:func:`circles.server.metrics.merge`) with its :class:`~circles.server.metrics.Tally`, the
memory of the counts of every process that ever answered: a process that dies, is started again
(counting from 0) or hangs keeps its share of the counters, so no counter ever goes down while
the server runs, whichever process a scrape reaches (the Tally's docstring says why); it shows as
``circles_process_up`` 0 meanwhile. The memory must be in one place that lives as long as the
server, for the answer not to depend on which process gives it: the first process is that place
(the others die with it). The others keep no answer of their own: each scrape they take asks the
first (only a question in flight is shared), since an answer they kept could be older than one
the first gave since, and lower. If the first process does not answer within
:data:`WHOLE_TIMEOUT` (it hangs: then nothing restarts a process either), ``/metrics`` answers 503:
a failed scrape, not one with lower counts.

Why not prometheus-client's multiprocess mode: it sums files of mmapped values that outlive their
processes, and so does keep a dead process's counts (what the Tally does), but only of the values
prometheus-client itself writes: the series we read when scraped (open connections, refused
connections, Redis reconnects, workers, memory) have no file and would be the answering process's
alone, so the sockets would be needed anyway. Besides, a process started again writes files of
its own (named by pid) beside its predecessors', a directory growing with every restart, to
empty when the server starts and at no other time; its gauges need a mode each; it is set for the
whole interpreter before prometheus-client is imported (a server's registry is its own: tests run
several in one process); and it says nothing of readiness. The sockets answer with what is true
now, the Tally adds what was true of the dead, and a dead process shows as dead. Why not the log pipe
(:mod:`circles.server.processes.group`): it goes one way, to the first process, and the others
must answer scrapes too.

Costs: nothing with ``--processes 1`` (:func:`join` is never called). A client cannot multiply
the work: one round of questions per kind of request is shared by all the requests that come
while it runs and for :data:`FRESH` seconds after it started, so a flood of ``/ready`` or
``/metrics`` costs at most one round a second per process (a scrape another process takes costs
the first one an answer it has already made). An answer is read up to :data:`MAX_ANSWER` bytes; a
question is a line of at most 64 bytes, and a connection that sends none is closed after
:data:`ASK_TIMEOUT`. Time is the reactor's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from circles.common.logs import Logger
from circles.common.once import Once
from circles.server.metrics import Tally, merge

log = Logger()

#: Seconds a process gets to answer another's question (connecting included).
ASK_TIMEOUT = 2.0
#: Seconds the answer of one round of questions serves every request of its kind.
FRESH = 1.0
#: Seconds a process gives the first process to answer ``whole``: a round of its own questions
#: (:data:`ASK_TIMEOUT`) and the merge.
WHOLE_TIMEOUT = 2 * ASK_TIMEOUT
#: The largest answer read from another process, in bytes.
MAX_ANSWER = 8 * 1024 * 1024
#: The process that merges the scrapes and keeps the server's counts (it lives as long as the server).
FIRST = 1


def socket_path(directory: str, number: int) -> str:
    """Where process ``number`` listens."""
    return os.path.join(directory, f"{number}.sock")


class _Answering(LineOnlyReceiver, TimeoutMixin):
    """One question, one answer, closed."""
    transport: ITCPTransport  # a unix socket's, set before any callback

    delimiter = b"\n"
    MAX_LENGTH = 64

    def connectionMade(self) -> None:
        self.setTimeout(ASK_TIMEOUT)

    def lineReceived(self, line: bytes) -> None:
        self.setTimeout(None)
        answer = self.factory.answers.get(line.strip())
        if answer is None:
            self.transport.loseConnection()
            return
        result = answer()
        if isinstance(result, Deferred):  # the first process's "whole": after its round
            result.addBoth(self._answer)
        else:
            self._answer(result)

    def _answer(self, answer) -> None:
        if isinstance(answer, bytes):
            self.transport.write(answer)
        self.transport.loseConnection()  # otherwise: no answer (the asker says so)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()


class _Asking(Protocol):
    """Sends one question; ``done`` fires with the answer, or None (too long, cut off)."""
    transport: ITCPTransport  # a unix socket's, set before any callback

    def __init__(self, question: bytes) -> None:
        self._question = question
        self._chunks: list | None = []
        self._size = 0
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._question + b"\n")

    def dataReceived(self, data: bytes) -> None:
        if self._chunks is None:
            return
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self._chunks = None
            self.transport.abortConnection()
            return
        self._chunks.append(data)

    def give_up(self) -> None:
        self._chunks = None
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None if self._chunks is None else b"".join(self._chunks))


class _Round:
    def __init__(self, started: float) -> None:
        self.started = started
        self.answer = Once()


class Siblings:
    """What process ``number`` of ``count`` says for the whole server: :meth:`metrics`,
    :meth:`ready`. ``local_metrics`` and ``local_problem`` are what it says for itself (its
    exposition; why it is not ready, or None); ``generation``: the how-manyth process in its
    number's place it is (the first process says how many times it started one there)."""

    def __init__(self, reactor, number: int, count: int, directory: str, local_metrics: Callable[[], bytes],
                 local_problem: Callable[[], str | None], generation: int = 1) -> None:
        self._reactor = reactor
        self.number = number
        self.count = count
        self.directory = directory
        self._local = {b"metrics": lambda: b"%d\n%b" % (generation, local_metrics()),
                       b"ready": lambda: _ready_answer(local_problem())}
        self._rounds: dict[bytes, _Round] = {}
        #: The whole server's counts (:class:`circles.server.metrics.Tally`): the first process's alone.
        self.tally = Tally() if number == FIRST else None

    def answers(self) -> dict:
        """The questions this process answers on its socket: ``{question: () -> bytes, or a
        Deferred of bytes}``; the first process answers ``whole`` too (:meth:`metrics`)."""
        answers: dict[bytes, Callable] = dict(self._local)
        if self.tally is not None:
            answers[b"whole"] = self.metrics
        return answers

    def metrics(self) -> Deferred:
        """The whole server's exposition (bytes), or None if it cannot be told (the first process
        did not answer); never fails. The first process merges the answers of all; the others
        ask it, every time (sharing only a question in flight: an answer they kept could be
        older than one it gave since)."""
        if self.tally is None:
            return self._shared(b"whole", self._from_first, fresh=0.0)
        return self._shared(b"metrics", self._merge)

    def ready(self) -> Deferred:
        """``(problem, processes)``: the first reason a process gives (or that it did not answer),
        None if every one is ready; and ``{number: "ready" or its problem}``; never fails."""
        return self._shared(b"ready", lambda: self._ask_all(b"ready", _whole_readiness))

    def _shared(self, question: bytes, ask: Callable, fresh: float = FRESH) -> Deferred:
        now = self._reactor.seconds()
        current = self._rounds.get(question)
        if current is None or (current.answer.fired and now - current.started >= fresh):
            current = self._rounds[question] = _Round(now)
            ensureDeferred(ask()).addBoth(current.answer.fire)
        return current.answer.when()

    async def _merge(self) -> bytes:
        assert self.tally is not None
        tally = self.tally
        return await self._ask_all(b"metrics", lambda answers: merge({n: _generation_and_exposition(a)
                                                                      for n, a in answers.items()}, tally))

    async def _from_first(self) -> bytes | None:
        answer = await self._ask(FIRST, b"whole", WHOLE_TIMEOUT)
        return answer if isinstance(answer, bytes) and answer else None  # closed unanswered: none

    async def _ask_all(self, question: bytes, combine: Callable):
        others = [n for n in range(1, self.count + 1) if n != self.number]
        results = await DeferredList([ensureDeferred(self._ask(n, question)) for n in others], consumeErrors=True)
        answers: dict[int, Any] = {self.number: self._local[question]()}
        for number, (ok, answer) in zip(others, results):
            answers[number] = answer if ok else "not answering"
        try:
            return combine(answers)
        except Exception:
            log.failure("could not combine the server processes' answers to {question}", question=question.decode())
            return combine({self.number: answers[self.number]})  # what it knows for sure

    async def _ask(self, number: int, question: bytes, timeout: float = ASK_TIMEOUT) -> bytes | str:
        """Process ``number``'s answer, or why there is none: "not running" (nothing listens on
        its socket) or "not answering" (no whole answer within ``timeout``)."""
        deadline = self._reactor.seconds() + timeout
        asking = _Asking(question)
        connecting = connectProtocol(UNIXClientEndpoint(self._reactor, socket_path(self.directory, number),
                                                        timeout=timeout), asking)
        connecting.addTimeout(timeout, self._reactor)
        try:
            await connecting
        except Exception:  # no socket, refused (dead), or no accept in time
            return "not running"
        timer = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), asking.give_up)
        try:
            answer = await asking.done
            return "not answering" if answer is None else answer
        finally:
            if timer.active():
                timer.cancel()


def _generation_and_exposition(answer: bytes | str) -> tuple[int, bytes] | None:
    """A process's answer to ``metrics``: its generation, a line, then its exposition; None for
    no answer, or one not of that form."""
    if not isinstance(answer, bytes):
        return None
    generation, _, exposition = answer.partition(b"\n")
    try:
        return int(generation), exposition
    except ValueError:
        return None


def _ready_answer(problem: str | None) -> bytes:
    return json.dumps({"problem": problem}).encode("utf-8")


def _whole_readiness(answers: dict[int, bytes | str]) -> tuple:
    states = {}
    for number in sorted(answers):
        answer = answers[number]
        try:
            problem = answer if isinstance(answer, str) else json.loads(answer)["problem"]
        except (ValueError, KeyError, TypeError):
            problem = "not answering"
        states[number] = "ready" if problem is None else str(problem)
    first = next(((n, state) for n, state in states.items() if state != "ready"), None)
    return (None if first is None else f"server process {first[0]}: {first[1]}"), states


class _AnsweringFactory(Factory):
    protocol = _Answering
    noisy = False

    def __init__(self, answers: dict) -> None:
        self.answers = answers

    def logPrefix(self) -> str:
        return "circles processes' socket"  # its port's line: "circles processes' socket starting on '...'"


class ProcessSocket(Service):
    """Listens on this process's socket once ``listening()`` fired (the process serves); stops
    listening with the service; ``remove`` (the first process's): the directory, made as it starts
    and removed as it stops."""

    def __init__(self, reactor, siblings: Siblings, listening: Callable[[], Deferred],
                 remove: str | None = None) -> None:
        self._reactor = reactor
        self._siblings = siblings
        self._listening = listening
        self._remove = remove
        self._port = None

    def startService(self) -> None:
        if self._remove is not None:
            # Made here, not when the service was built: after twistd's --uid, by the user the
            # processes run as. Exclusively: a directory someone else made is refused.
            os.mkdir(self._remove, 0o700)
        super().startService()
        self._listening().addCallbacks(self._listen, lambda failure: None)  # the listener logs why not

    def _listen(self, _ports) -> None:
        if not self.running:
            return
        path = socket_path(self._siblings.directory, self._siblings.number)
        try:
            os.unlink(path)  # left by a process killed before it could remove it
        except FileNotFoundError:
            pass
        endpoint = UNIXServerEndpoint(self._reactor, path, mode=0o600)
        endpoint.listen(_AnsweringFactory(self._siblings.answers())).addCallbacks(self._bound, self._failed, (), {},
                                                                                   (path,))

    def _bound(self, port) -> None:
        if self.running:
            self._port = port
        else:
            port.stopListening()

    def _failed(self, failure, path: str) -> None:
        log.error("cannot answer the other server processes on {path}: {why}", path=path,
                  why=failure.getErrorMessage())

    def stopService(self):
        super().stopService()
        port, self._port = self._port, None
        d = port.stopListening() if port is not None else None
        if self._remove is not None:
            shutil.rmtree(self._remove, ignore_errors=True)
        return d


def join(service, number: int, count: int, directory: str, reactor, remove: bool = False,
         generation: int = 1) -> ProcessSocket:
    """Make ``service`` (a :class:`~circles.service.CirclesService`) process ``number`` of
    ``count`` (the ``generation``-th in that place): its ``/metrics`` and ``/ready`` answer for the
    whole server, and the returned service (to start with it) answers the others; ``remove``: the
    directory is removed when it stops (the first process: it makes it as it starts)."""
    gateway = service.gateway
    gateway.metrics.watch_process()
    siblings = Siblings(reactor, number, count, directory, gateway.metrics.exposition, gateway.unready_reason,
                        generation)
    gateway.metrics.whole = siblings.metrics
    gateway.siblings = siblings
    return ProcessSocket(reactor, siblings, service.when_listening, directory if remove else None)
