"""Webhook events that wait for replicas share their waits: one ``WAIT`` covers every event
written before it (group commit, ``circles/backend/group_wait.py``).

Real processes: a redis-server primary and one replica of it (``replicaof``). The replica is
made to acknowledge late, deterministically, by stopping it (SIGSTOP) while events are written
and continuing it (SIGCONT) within the timeout. What is measured is what is bounded: the
``WAIT`` commands the primary ran (``INFO commandstats``), the events answered, the events held.
"""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred, gatherResults

from circles.backend.dispatch import RedisScriptRunner
from circles.backend.redis_url import parse_redis_url
from circles.backend.replica_acks import MAX_ACK_WAITING
from circles.backend.scripts import BackendUnavailable
from devtools.redis_server import REDIS_SERVER, RedisProcess
from devtools.webhook_support import encode, stripe_event

from ..play_client import eventually, sleep
from .test_dispatch import request
from .test_webhooks_e2e import Stack

EVENTS = 16


def info(node: RedisProcess, section: str) -> dict[str, str]:
    client = node.client()
    try:
        lines = client("INFO", section).splitlines()
    finally:
        client.close()
    return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))


def waits(node: RedisProcess) -> int:
    """``WAIT`` commands ``node`` has run."""
    stats = info(node, "commandstats").get("cmdstat_wait")
    return 0 if stats is None else int(dict(item.split("=") for item in stats.split(","))["calls"])


class Pair:
    """A primary and a replica of it; :meth:`stopped` pauses the replica (it stays connected
    and acknowledges nothing) until :meth:`resume`."""

    def __init__(self, directory: str) -> None:
        os.makedirs(os.path.join(directory, "primary"))
        os.makedirs(os.path.join(directory, "replica"))
        # The replica's first sync at once, not after the default 5 s of waiting for others.
        self.primary = RedisProcess(os.path.join(directory, "primary"), args=["--repl-diskless-sync-delay", "0"])
        self.replica = RedisProcess(os.path.join(directory, "replica"),
                                    args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.paused = False

    def start(self) -> None:
        self.primary.start()
        self.replica.start()

    def linked(self) -> bool:
        return info(self.replica, "replication").get("master_link_status") == "up" and \
            "state=online" in info(self.primary, "replication").get("slave0", "")

    def pause(self) -> None:
        os.kill(self.replica.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            os.kill(self.replica.process.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        self.resume()
        self.replica.kill()
        self.primary.kill()


@pytest.fixture
def pair(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    pair = Pair(str(tmp_path))
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()


async def linked_runner(pair: Pair, start, **kw) -> RedisScriptRunner:
    await eventually(pair.linked)
    runner = start(RedisScriptRunner(parse_redis_url(pair.primary.url), reactor=reactor, ack_replicas=1, **kw))
    await eventually(lambda: runner.is_connected() and runner.health.replicas == 1)
    return runner


@pytest_twisted.ensureDeferred
async def test_concurrent_events_share_their_waits(pair, start):
    """Before group commit each event had a WAIT of its own (16 here), two at a time."""
    runner = await linked_runner(pair, start, ack_timeout=10.0)
    before = waits(pair.primary)
    pair.pause()
    events = [runner.enqueue_once(request("event"), f'{{"n": {i}}}', f"stripe:c:evt_{i}", 600)
              for i in range(EVENTS)]
    await sleep(0.3)  # the replica acknowledges late, well within the timeout
    assert not any(event.called for event in events)
    pair.resume()
    queued = await gatherResults(events, consumeErrors=True)
    assert not any(q.duplicate for q in queued) and len({q.task_id for q in queued}) == EVENTS
    issued = waits(pair.primary) - before
    # The first event's WAIT went out alone; the 15 written while it blocked shared the next.
    assert issued <= 2, f"{issued} WAITs for {EVENTS} events"
    assert runner.awaiting_replicas == 0
    copy = pair.replica.client()
    try:  # answered: so on the replica, no polling needed
        for i, q in enumerate(queued):
            assert copy.hgetall(f"circles:task:{q.task_id}")["data"] == f'{{"n": {i}}}'
            assert copy("GET", f"circles:seen:stripe:c:evt_{i}") == q.task_id
    finally:
        copy.close()

    # Redeliveries are duplicates, and share their waits too (each rewrites its seen key first).
    before = waits(pair.primary)
    again = await gatherResults([runner.enqueue_once(request("event"), "{}", f"stripe:c:evt_{i}", 600)
                                 for i in range(EVENTS)], consumeErrors=True)
    assert [q.task_id for q in again] == [q.task_id for q in queued] and all(q.duplicate for q in again)
    assert waits(pair.primary) - before <= 3


@pytest_twisted.ensureDeferred
async def test_sixteen_concurrent_webhooks_are_answered_200_with_a_slow_replica(pair):
    """End to end: signed Stripe deliveries to a CirclesService, all at once."""
    await eventually(pair.linked)
    stack = await Stack(pair.primary, webhook_replicas=1, webhook_replica_timeout=10.0).start(worker=False)
    try:
        runner = stack.service.script_runner
        await eventually(lambda: runner.health.replicas == 1)
        before = waits(pair.primary)
        pair.pause()
        bodies = [encode(stripe_event(f"evt_http_{i}")) for i in range(EVENTS)]
        replies = [ensureDeferred(stack.stripe(body)) for body in bodies]
        await eventually(lambda: runner.awaiting_replicas == EVENTS)  # every delivery is written, none answered
        pair.resume()
        answered = await gatherResults(replies, consumeErrors=True)
        assert [reply.code for reply in answered] == [200] * EVENTS, answered
        issued = waits(pair.primary) - before
        assert issued <= 2, f"{issued} WAITs for {EVENTS} deliveries"
        print(f"\n{EVENTS} deliveries, {issued} WAITs: {EVENTS / issued:.0f} events per WAIT")
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_a_lost_write_connection_fails_every_event_it_carried(pair, start):
    """No event is acknowledged unless a WAIT on the connection that carried its writes said
    so: the connection killed while its WAIT blocks fails all 16 (503: the provider retries)."""
    runner = await linked_runner(pair, start, ack_timeout=10.0)
    before = waits(pair.primary)
    pair.pause()
    events = [runner.enqueue_once(request("event"), "{}", f"stripe:c:evt_lost_{i}", 600) for i in range(EVENTS)]
    client = pair.primary.client()
    try:
        [blocked] = await eventually(lambda: [c for c in client.clients() if c.get("cmd") == "wait"] or None)
        assert client("CLIENT", "KILL", "ID", blocked["id"]) == 1
    finally:
        client.close()
    outcomes = await DeferredList(events, consumeErrors=True)
    assert [ok for ok, _ in outcomes] == [False] * EVENTS
    assert all(f.check(BackendUnavailable) for _, f in outcomes)
    assert runner.awaiting_replicas == 0
    pair.resume()

    # The retries, once the write connection is back: each event queued once, on the replica.
    await eventually(lambda: runner._acks.size == 1)
    retried = await gatherResults([runner.enqueue_once(request("event"), "{}", f"stripe:c:evt_lost_{i}", 600)
                                   for i in range(EVENTS)], consumeErrors=True)
    assert len({q.task_id for q in retried}) == EVENTS
    copy = pair.replica.client()
    try:
        assert all(copy.hgetall(f"circles:task:{q.task_id}") for q in retried)
    finally:
        copy.close()
    assert waits(pair.primary) - before <= 4  # at most the killed one, and three for the retries


@pytest_twisted.ensureDeferred
async def test_events_waiting_for_replicas_are_bounded(pair, start):
    """A replica that never answers cannot make the server hold more than MAX_ACK_WAITING
    events: the next is refused at once, and each held one ends in 503 at the timeout."""
    runner = await linked_runner(pair, start, ack_timeout=1.0)
    pair.pause()
    held = [runner.enqueue_once(request("event"), "{}", f"stripe:c:evt_held_{i}", 600)
            for i in range(MAX_ACK_WAITING)]
    assert runner.awaiting_replicas == MAX_ACK_WAITING
    with pytest.raises(BackendUnavailable, match="too many webhook events waiting"):
        await runner.enqueue_once(request("event"), "{}", "stripe:c:evt_one_more", 600)
    outcomes = await DeferredList(held, consumeErrors=True)
    failures = [f for ok, f in outcomes if not ok]
    assert len(failures) == MAX_ACK_WAITING  # none is answered as held by the replica
    assert all(f.check(BackendUnavailable) and "0 of 1 Redis replica" in str(f.value) for f in failures)
    assert runner.awaiting_replicas == 0
