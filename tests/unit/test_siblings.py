"""The pieces of ``--processes`` that hold bytes or multiply work, each against its bound:
real Unix sockets between Siblings in this process, the relay's line reader fed real bytes.
What waits out the real deadlines is in tests/integration/test_siblings.py; the whole server
is in tests/integration/test_processes.py."""

from __future__ import annotations

import json
import os

import pytest_twisted
from twisted.internet import reactor

from circles.common import logs
from circles.server.processes import siblings
from circles.server.processes.group import MAX_LINE, _Lines
from circles.server.processes.siblings import ProcessSocket, Siblings, socket_path


def _process(directory: str, number: int, count: int, problem=None, exposition=b"") -> tuple[Siblings, dict]:
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
