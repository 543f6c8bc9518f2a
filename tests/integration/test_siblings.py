"""Siblings over real Unix sockets in this process, waiting out their real deadlines: a flood of
/ready asks and a dead or silent process. The quick pieces are in tests/unit/test_siblings.py;
the whole server is in tests/integration/test_processes.py."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet.defer import DeferredList

from circles.server.processes import siblings
from circles.server.processes.siblings import socket_path

from ..unit.test_siblings import _listening, _process, _sleep


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
        problem, states = await first.ready()  # the silent one is given up on at its deadline
        assert states == {1: "ready", 2: "not running", 3: "not answering"}
        assert problem == "server process 2: not running"
        await _sleep(siblings.FRESH)
        exposition = (await first.metrics()).decode()
        assert 'circles_process_up{process="2"} 0.0' in exposition and 'circles_process_up{process="3"} 0.0' in exposition
        assert "circles_connections_open 2.0" in exposition
    finally:
        silent.close()


@pytest_twisted.ensureDeferred
async def test_a_hung_first_process_makes_the_others_scrape_fail_not_drop(tmp_path):
    """The first process keeps the server's counts: one that does not answer within
    WHOLE_TIMEOUT leaves the others nothing to say (/metrics 503), rather than their own lower sums."""
    silent = socket.socket(socket.AF_UNIX)  # listens (the kernel accepts) and never answers: hung
    silent.bind(socket_path(str(tmp_path), 1))
    silent.listen(8)
    try:
        second, asked = _process(str(tmp_path), 2, 2, exposition=b"# TYPE circles_connections_open gauge\n")
        assert await second.metrics() is None
        assert asked["metrics"] == 0  # it never answers with its own share
    finally:
        silent.close()
