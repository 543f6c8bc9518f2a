"""The pieces of ``--processes`` that hold bytes or multiply work, each against its bound:
real Unix sockets between Siblings in this process, the relay's line reader fed real bytes.
What waits out the real deadlines is in tests/integration/test_siblings.py; the whole server
is in tests/integration/test_processes.py."""

from __future__ import annotations

import json
import os
import random
import socket

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from circles.common import logs
from circles.server.metrics import Metrics, Tally, merge
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


async def _listening(start, member: Siblings) -> ProcessSocket:
    from twisted.internet.defer import succeed
    service = start(ProcessSocket(reactor, member, lambda: succeed([])))
    while not os.path.exists(socket_path(member.directory, member.number)):
        await _sleep(0.01)
    return service


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


# --- the whole server's counts (circles.server.metrics.Tally) ------------------------------------


def _served(requests: int, plays: tuple = ()) -> Metrics:
    """A process's metrics, having counted ``requests`` whoami calls and timed ``plays``."""
    metrics = Metrics(reactor)
    metrics.label_methods(["whoami"])
    for _ in range(requests):
        metrics.request("whoami", "ok")
    for seconds in plays:
        metrics.play_seconds.observe(seconds)
    return metrics


def _merged(tally: Tally, **answers) -> dict:
    """:func:`merge` of ``p1=(generation, Metrics)``..., None for a process that did not answer:
    every sample by (name, labels)."""
    text = merge({int(name[1:]): None if answer is None else (answer[0], answer[1].exposition())
                  for name, answer in answers.items()}, tally)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode()) for sample in family.samples}


WHOAMI = ("circles_requests_total", (("method", "whoami"), ("outcome", "ok")))
PLAYS = ("circles_play_seconds_count", ())


def test_a_process_started_again_adds_to_its_former_share_once():
    tally = Tally()
    first, second = _served(3, (0.3,)), _served(5, (0.3, 0.3))
    assert _merged(tally, p1=(1, first), p2=(1, second))[WHOAMI] == 8
    for _ in range(3):  # dead: its share stays, however many scrapes
        assert _merged(tally, p1=(1, first), p2=None)[WHOAMI] == 8
    again = _served(0)  # started again in its place: counts from 0
    assert _merged(tally, p1=(1, first), p2=(2, again))[WHOAMI] == 8
    again.request("whoami", "ok")
    again.play_seconds.observe(0.01)
    for _ in range(3):  # its former share is added once, not at every scrape
        merged = _merged(tally, p1=(1, first), p2=(2, again))
        assert (merged[WHOAMI], merged[PLAYS]) == (9, 4)
        assert merged[("circles_play_seconds_bucket", (("le", "0.01"),))] == 1
        assert merged[("circles_play_seconds_bucket", (("le", "0.5"),))] == 4
        assert merged[("circles_process_up", (("process", "2"),))] == 1
    assert tally.retired[("circles_requests", *WHOAMI)] == 5


def test_an_answer_of_a_generation_gone_is_ignored():
    """Sent before it died, read after its successor's answer: neither a new share nor a drop."""
    tally = Tally()
    first, old, new = _served(1), _served(5), _served(2)
    _merged(tally, p1=(1, first), p2=(1, old))
    assert _merged(tally, p1=(1, first), p2=(2, new))[WHOAMI] == 8
    old.request("whoami", "ok")
    assert _merged(tally, p1=(1, first), p2=(1, old))[WHOAMI] == 8
    assert _merged(tally, p1=(1, first), p2=(2, new))[WHOAMI] == 8


def test_a_hung_process_keeps_its_highest_share():
    tally = Tally()
    first, second = _served(3), _served(5)
    assert _merged(tally, p1=(1, first), p2=(1, second))[WHOAMI] == 8
    assert _merged(tally, p1=(1, first), p2=None)[WHOAMI] == 8  # hung
    for _ in range(4):
        second.request("whoami", "ok")  # it went on counting before it hung
    assert _merged(tally, p1=(1, first), p2=(1, second))[WHOAMI] == 12  # back: its live count
    assert _merged(tally, p1=(1, first), p2=(1, _served(2)))[WHOAMI] == 12  # never less than seen (the max)


def test_no_counting_sample_ever_goes_down_and_each_generation_counts_once():
    """Many deaths, restarts, hangs and scrapes, in a fixed order: each scrape reports exactly the
    sum, over every generation, of its counts when it last answered, and never less than before."""
    rng = random.Random(20240611)  # fixed: the same sequence on every run
    tally = Tally()
    live = {1: [1, _served(0)], 2: [1, _served(0)], 3: [1, _served(0)]}
    last_answered: dict = {}  # (number, generation) -> its whoami count when it last answered
    hung: set = set()
    before: dict = {}
    for _ in range(400):
        number = rng.choice([2, 3])
        event = rng.choice(["count", "count", "kill", "hang", "scrape"])
        if event == "count":
            for _ in range(rng.randint(1, 5)):
                live[rng.choice([1, number])][1].request("whoami", "ok")
        elif event == "kill":
            live[number] = [live[number][0] + 1, _served(0)]
            hung.discard(number)
        elif event == "hang":
            hung ^= {number}
        answering = {n: g_m for n, g_m in live.items() if n not in hung and rng.random() < 0.8 or n == 1}
        merged = _merged(tally, **{f"p{n}": tuple(answering[n]) if n in answering else None for n in live})
        for n, (generation, metrics) in answering.items():
            last_answered[(n, generation)] = metrics._requests._counts.get(("whoami", "ok"), 0)
        assert merged.get(WHOAMI, 0) == sum(last_answered.values())
        counting = {key: value for key, value in merged.items() if key[0].endswith(("_total", "_count", "_bucket"))}
        assert all(counting.get(key, -1) >= value for key, value in before.items()), (before, counting)
        before = counting


def test_a_family_only_a_dead_process_counted_is_still_reported_with_its_earliest_creation():
    tally = Tally()
    first, second = _served(1), _served(1)
    second.webhooks.labels("stripe", "200").inc(2)
    merged = _merged(tally, p1=(1, first), p2=(1, second))
    created = merged[("circles_webhooks_created", (("provider", "stripe"), ("status", "200")))]
    for answer in (None, (2, _served(0))):  # dead, then started again
        merged = _merged(tally, p1=(1, first), p2=answer)
        assert merged[("circles_webhooks_total", (("provider", "stripe"), ("status", "200")))] == 2
        assert merged[("circles_webhooks_created", (("provider", "stripe"), ("status", "200")))] == created
    text = merge({1: (1, first.exposition()), 2: None}, tally).decode()
    assert "# TYPE circles_webhooks_total counter" in text and "# HELP circles_webhooks_total Webhook" in text


def test_gauges_are_the_answering_processes_and_a_garbled_answer_is_none():
    tally = Tally()
    first, second = _served(1), _served(2)
    first.tcp_connections.set(3)
    second.tcp_connections.set(4)
    assert _merged(tally, p1=(1, first), p2=(1, second))[("circles_tcp_connections_open", ())] == 7
    text = merge({1: (1, first.exposition()), 2: (1, b"\xff not an exposition {")}, tally)
    merged = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert merged[("circles_tcp_connections_open", ())] == 3
    assert merged[("circles_process_up", (("process", "2"),))] == 0
    assert merged[WHOAMI] == 3  # its share as last seen


@pytest_twisted.ensureDeferred
async def test_the_others_ask_the_first_for_the_whole_server(tmp_path, start):
    """Whichever process a scrape reaches, the first one's tally answers it: a process started
    again (the next generation) adds to its former share, in any process's answer."""
    directory = str(tmp_path)
    first = Siblings(reactor, 1, 2, directory, _served(3).exposition, lambda: None)
    second = Siblings(reactor, 2, 2, directory, _served(5).exposition, lambda: None)
    await _listening(start, first)
    service = await _listening(start, second)
    assert _whoami(await second.metrics()) == 8
    await service.stopService()  # dies (its socket is gone)
    assert _whoami(await second.metrics()) == 8  # its own round: it asks the first every time
    again = Siblings(reactor, 2, 2, directory, _served(1).exposition, lambda: None, generation=2)
    await _listening(start, again)
    await _sleep(siblings.FRESH)  # the first one's view is asked again
    assert _whoami(await again.metrics()) == 9
    assert _whoami(await first.metrics()) == 9


@pytest_twisted.ensureDeferred
async def test_without_the_first_process_there_is_no_whole_server_exposition(tmp_path):
    socket.socket(socket.AF_UNIX).bind(socket_path(str(tmp_path), 1))  # nobody listens: dead
    second = Siblings(reactor, 2, 2, str(tmp_path), _served(5).exposition, lambda: None)
    assert await second.metrics() is None


def test_a_scrape_without_the_whole_server_is_a_503_not_lower_counts():
    from twisted.internet.defer import succeed
    from twisted.web.test.requesthelper import DummyRequest

    from circles.server.http.site import MetricsPage
    metrics = _served(1)
    metrics.whole = lambda: succeed(None)
    request = DummyRequest([b""])
    MetricsPage(metrics).render_GET(request)
    assert request.responseCode == 503 and request.finished
    assert b"server process 1" in b"".join(request.written)
    assert b"circles_requests_total" not in b"".join(request.written)


def _whoami(exposition: bytes) -> float | None:
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == WHOAMI[0] and tuple(sorted(sample.labels.items())) == WHOAMI[1]:
                return sample.value
    return None
