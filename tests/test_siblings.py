"""The pieces of ``--processes`` that hold bytes or multiply work, each against its bound:
real Unix sockets between Siblings in this process, the relay's line reader fed real bytes.
(The whole server is in tests/test_processes.py.)"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from circles.common import logs

from circles.server.processes import siblings
from circles.server.processes.group import MAX_LINE, _Lines
from circles.server.processes.siblings import ProcessSocket, Siblings, socket_path


def _process(directory: str, number: int, count: int, problem=None, exposition=b"") -> "tuple[Siblings, dict]":
    calls = {"metrics": 0, "ready": 0}

    def metrics():
        calls["metrics"] += 1
        return exposition

    def ready():
        calls["ready"] += 1
        return problem

    return Siblings(reactor, number, count, directory, metrics, ready), calls


async def _listening(start, member: Siblings) -> None:
    from twisted.internet.defer import succeed
    start(ProcessSocket(reactor, member, lambda: succeed([])))
    while not os.path.exists(socket_path(member.directory, member.number)):
        await _sleep(0.01)


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_flood_of_ready_asks_the_others_once(tmp_path, start):
    """/ready is unauthenticated: 500 at once must not become 500 questions to every process."""
    first, _ = _process(str(tmp_path), 1, 2)
    second, asked = _process(str(tmp_path), 2, 2)
    await _listening(start, second)
    answers = await DeferredList([first.ready() for _ in range(500)], fireOnOneErrback=True)
    assert {tuple(map(str, answer[1][1].items())) for answer in answers} == {(str((1, "ready")), str((2, "ready")))}
    assert asked["ready"] == 1
    await _sleep(siblings.FRESH + 0.1)  # then it asks again
    await first.ready()
    assert asked["ready"] == 2


@pytest_twisted.ensureDeferred
async def test_a_dead_or_silent_process_is_reported_within_the_deadline(tmp_path, start):
    first, _ = _process(str(tmp_path), 1, 3, exposition=b"# TYPE circles_connections_open gauge\ncircles_connections_open 2\n")
    socket.socket(socket.AF_UNIX).bind(socket_path(str(tmp_path), 2))  # a socket nobody listens on: dead
    silent = socket.socket(socket.AF_UNIX)  # listens (the kernel accepts) and never answers: hung
    silent.bind(socket_path(str(tmp_path), 3))
    silent.listen(8)
    try:
        started = time.monotonic()
        problem, states = await first.ready()
        assert time.monotonic() - started < siblings.ASK_TIMEOUT + 1
        assert states == {1: "ready", 2: "not running", 3: "not answering"}
        assert problem == "server process 2: not running"
        await _sleep(siblings.FRESH)
        exposition = (await first.metrics()).decode()
        assert 'circles_process_up{process="2"} 0.0' in exposition and 'circles_process_up{process="3"} 0.0' in exposition
        assert "circles_connections_open 2.0" in exposition
    finally:
        silent.close()


@pytest_twisted.ensureDeferred
async def test_an_answer_is_read_up_to_its_bound(tmp_path, start, monkeypatch):
    monkeypatch.setattr(siblings, "MAX_ANSWER", 1000)  # the bound, made small enough to pass here
    first, _ = _process(str(tmp_path), 1, 2)
    second, _ = _process(str(tmp_path), 2, 2, problem="x" * 5000)
    await _listening(start, second)
    problem, states = await first.ready()
    assert states[2] == "not answering"


def test_the_relay_holds_at_most_one_line_of_a_process_that_never_ends_one():
    lines = _Lines(MAX_LINE)
    out = []
    for _ in range(200):  # 200 MiB without a newline
        out += lines.feed(b"x" * (1 << 20))
        assert len(lines._buffer) <= MAX_LINE
    out += lines.feed(b"tail\n" + b'{"more": 1}\n')
    assert [(line[:3], length) for line, length in out] == [(b"xxx", 200 * (1 << 20) + 4), (b'{"m', 0)]
    assert len(out[0][0]) <= 200  # only its start, for the note


def test_a_huge_event_is_relayed_cut_short():
    event = {"log_format": "{big}", "big": "é" * (1 << 20), "log_level": logs.LogLevel.info,
             "log_namespace": "circles.test", "log_time": 1.0}
    line = logs.relay_line(event)
    assert len(line.encode("utf-8")) <= logs.RELAY_LINE_LIMIT
    relayed = logs.relayed_event(line)
    assert relayed["log_namespace"] == "circles.test" and "cut short" in relayed["text"]
    assert json.loads(line)  # one line of JSON
