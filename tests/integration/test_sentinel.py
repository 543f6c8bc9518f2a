"""Redis with Sentinel: the server and the worker follow a failover of real redis-server
processes (a primary, a replica, three Sentinels: ``replicated_redis``), and webhook events are
acknowledged only once a replica holds them."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from circles.backend.dispatch import RedisScriptRunner
from circles.backend.reachability import Reachability
from circles.backend.redis import connect, reached
from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import BackendUnavailable
from circles.server.config import Config
from circles.worker.service import Worker
from devtools.redis_server import REDIS_SERVER, RedisProcess, ReplicatedRedis, SentinelProcess

from ..play_client import eventually, sleep
from .test_dispatch import CIRCLE, echo_engine, request
from .test_ops import _get
from .test_play_ws import serve


def runner_for(redis, **kw) -> RedisScriptRunner:
    return RedisScriptRunner(parse_redis_url(redis.url), reactor=reactor, **kw)


def worker_for(redis, engine=echo_engine) -> Worker:
    return Worker(parse_redis_url(redis.url), [CIRCLE], engine, reactor=reactor, concurrency=2)


def live_on(node, worker: Worker) -> bool:
    """Whether ``worker`` counts as live on ``node`` (its heartbeat reached it, its TTL not passed)."""
    client = node.client()
    try:
        score = client("ZSCORE", f"circles:workers:{CIRCLE}", worker.worker_id)
        seconds, micros = client("TIME")
        return score is not None and float(score) >= int(seconds) + int(micros) / 1e6
    finally:
        client.close()


def port_of(factory) -> int:
    """The port of the node a connection factory is on now."""
    return factory.primary[1]


@pytest_twisted.ensureDeferred
async def test_plays_follow_a_failover_and_none_is_left_waiting(replicated_redis, start):
    held: list[Deferred] = []

    def engine(script, context):
        if script == "hold":
            held.append(Deferred())
            return held[-1]
        return echo_engine(script, context)

    runner = start(runner_for(replicated_redis))
    worker = start(worker_for(replicated_redis, engine))
    await eventually(runner.is_connected)
    await eventually(lambda: worker.registered)
    old = replicated_redis.primary()
    assert port_of(runner._commands) == old.port
    assert reached(runner.address, runner._commands).endswith(f"(primary 127.0.0.1:{old.port})")
    assert json.loads(await runner.run(request("before")))["script"] == "before"

    in_flight = runner.run(request("hold", timeout=120))  # a deadline far beyond the failover
    await eventually(lambda: held)
    old.kill()
    with pytest.raises(BackendUnavailable):  # answered at once, not at its deadline
        await in_flight
    assert not runner.is_connected()

    new = replicated_redis.wait_for_new_primary(old)
    await eventually(runner.is_connected)
    assert port_of(runner._commands) == port_of(runner._replies) == new.port
    await eventually(lambda: live_on(new, worker))  # the worker heartbeats on the new primary
    # The reply list is read on the new primary, and the worker takes tasks from it.
    assert json.loads(await runner.run(request("after")))["script"] == "after"
    assert port_of(worker._commands) == port_of(worker._blocking[CIRCLE]) == new.port
    held[0].callback("too late")  # its result finds nobody waiting, and nothing is answered twice
    await sleep(0.2)
    assert runner.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_demoted_primary_is_left_for_the_new_one(replicated_redis, start):
    """SENTINEL FAILOVER: the old primary stays up, as a replica; nothing is written to it."""
    runner = start(runner_for(replicated_redis))
    worker = start(worker_for(replicated_redis))
    await eventually(runner.is_connected)
    await eventually(lambda: worker.registered)
    old = replicated_redis.primary()
    sentinel = replicated_redis.sentinels[0].client()
    try:
        assert sentinel("SENTINEL", "FAILOVER", replicated_redis.master) == "OK"
    finally:
        sentinel.close()
    new = replicated_redis.wait_for_new_primary(old)
    await eventually(lambda: runner.is_connected() and port_of(runner._commands) == new.port)
    await eventually(lambda: live_on(new, worker))  # the worker heartbeats on the new primary
    output = json.loads(await runner.run(request("on the new primary")))
    client = new.client()
    try:
        assert client.hgetall(f"circles:task:{output['task_id']}")["status"] == "completed"
    finally:
        client.close()
    client = old.client()
    try:
        assert client("ROLE")[0] == "slave"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_ready_is_503_while_no_primary_is_known(replicated_redis, start):
    service, port = await serve(start, replicated_redis.url)
    base = f"http://127.0.0.1:{port}"
    assert (await _get(base + "/ready"))[0] == 200
    old = replicated_redis.primary()
    old.kill()
    status, _, body = await _get(base + "/ready")
    assert status == 503 and json.loads(body)["reason"] == "script backend unavailable"
    replicated_redis.wait_for_new_primary(old)
    await eventually(service.script_runner.is_connected)
    assert (await _get(base + "/ready"))[0] == 200



@pytest_twisted.ensureDeferred
async def test_webhook_events_are_acknowledged_by_a_replica(replicated_redis, start):
    runner = start(runner_for(replicated_redis, ack_replicas=1, ack_timeout=0.5))
    await eventually(lambda: runner.is_connected() and runner.health.replicas == 1)
    primary = replicated_redis.primary()
    [replica] = [node for node in replicated_redis.nodes if node is not primary]

    queued = await runner.enqueue_once(request("event"), '{"id": "evt_1"}', "stripe:c:evt_1", 600)
    assert not queued.duplicate
    copy = replica.client()
    try:  # WAIT said the replica has it: no need to poll
        assert copy.hgetall(f"circles:task:{queued.task_id}")["data"] == '{"id": "evt_1"}'
        assert copy("GET", "circles:seen:stripe:c:evt_1") == queued.task_id
    finally:
        copy.close()

    # A replica that is connected but silent: WAIT's bound, then 503. Plays go on meanwhile.
    worker = start(worker_for(replicated_redis))
    await eventually(lambda: worker.registered)
    os.kill(replica.process.pid, signal.SIGSTOP)
    try:
        waiting = runner.enqueue_once(request("event"), "{}", "stripe:c:evt_2", 600)
        assert json.loads(await runner.run(request("a play meanwhile")))["script"] == "a play meanwhile"
        with pytest.raises(BackendUnavailable, match="0 of 1 Redis replica"):
            await waiting
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)
    # The event is on the primary; its redelivery is a duplicate, acknowledged now.
    again = await runner.enqueue_once(request("event"), "{}", "stripe:c:evt_2", 600)
    assert again.duplicate

    # No replica at all: refused at once, without waiting.
    replica.kill()
    await eventually(lambda: runner.health.replicas == 0)
    with pytest.raises(BackendUnavailable, match="0 replica"):
        await runner.enqueue_once(request("event"), "{}", "stripe:c:evt_3", 600)
    assert runner.is_connected()  # plays are not affected


@pytest_twisted.ensureDeferred
async def test_deduplication_holds_across_a_failover(replicated_redis, start):
    runner = start(runner_for(replicated_redis, ack_replicas=1))
    await eventually(lambda: runner.is_connected() and runner.health.replicas == 1)
    first = await runner.enqueue_once(request("event"), "{}", "stripe:c:evt_f", 600)
    old = replicated_redis.primary()
    old.kill()
    new = replicated_redis.wait_for_new_primary(old)
    await eventually(lambda: runner.is_connected() and port_of(runner._commands) == new.port)
    await eventually(lambda: runner.health.replicas == 0)
    with pytest.raises(BackendUnavailable):  # the new primary has no replica yet
        await runner.enqueue_once(request("event"), "{}", "stripe:c:evt_f", 600)
    old.args = ["--replicaof", "127.0.0.1", str(new.port)]  # the old node comes back as a replica
    old.start()
    await eventually(lambda: runner.health.replicas == 1)
    again = await runner.enqueue_once(request("event"), "{}", "stripe:c:evt_f", 600)
    assert again.duplicate and again.task_id == first.task_id


def test_how_many_replicas_webhooks_wait_for():
    sentinel = "redis+sentinel://127.0.0.1:26379/mymaster/0"
    assert Config().webhook_acks() == 0
    assert Config(redis_url="redis://127.0.0.1:6379/0").webhook_acks() == 0
    assert Config(redis_url=sentinel).webhook_acks() == 1
    assert Config(redis_url=sentinel, webhook_replicas=0).webhook_acks() == 0
    assert Config(redis_url="redis://127.0.0.1:6379/0", webhook_replicas=2).webhook_acks() == 2


@pytest_twisted.ensureDeferred
async def test_a_result_finished_during_a_failover_is_recorded_on_the_new_primary(replicated_redis, start):
    """A webhook event's script that was running when the primary died: nobody waits for its
    result, so the worker records it once the new primary answers instead of dropping it."""
    held: list[Deferred] = []

    def engine(script, context):
        held.append(Deferred())
        return held[-1]

    runner = start(runner_for(replicated_redis, ack_replicas=1))
    worker = start(worker_for(replicated_redis, engine))
    await eventually(lambda: runner.is_connected() and runner.health.replicas == 1)
    queued = await runner.enqueue_once(request("event"), "{}", "stripe:c:evt_r", 600)
    await eventually(lambda: held)
    old = replicated_redis.primary()
    [replica] = [node for node in replicated_redis.nodes if node is not old]
    copy = replica.client()
    try:  # the claim reached the replica
        await eventually(lambda: copy.hgetall(f"circles:task:{queued.task_id}").get("status") == "processing")
    finally:
        copy.close()
    old.kill()
    held[0].callback("ran through the failover")
    new = replicated_redis.wait_for_new_primary(old)
    client = new.client()
    try:
        task = await eventually(lambda: (lambda t: t if t.get("status") == "completed" else None)(
            client.hgetall(f"circles:task:{queued.task_id}")))
    finally:
        client.close()
    # Recorded by the worker that ran it (the result itself is not kept: nobody waits for it).
    assert (task["worker"], task["attempts"]) == (worker.worker_id, "1") and "output" not in task


@pytest_twisted.ensureDeferred
async def test_passwords_of_the_nodes_and_of_the_sentinels(tmp_path, start):
    node = RedisProcess(str(tmp_path))
    node.start()
    sentinel = SentinelProcess(str(tmp_path), "m", node.port, quorum=1)
    with open(sentinel.config, "a") as f:
        f.write("sentinel auth-pass m node-pw\nrequirepass sentinel-pw\n")
    try:
        client = node.client()
        client("CONFIG", "SET", "requirepass", "node-pw")
        client.close()
        sentinel.start_with_password("sentinel-pw")
        refusals = []

        class Told(Reachability):
            def refused(self, failure):
                refusals.append(failure.getErrorMessage())

        base = f"redis+sentinel://:{{}}@127.0.0.1:{sentinel.port}/m/0?sentinel_password=sentinel-pw"
        wrong = parse_redis_url(base.format("wrong"))
        factory = connect(wrong, reactor, watch=Told(wrong, reactor))
        try:
            await eventually(lambda: refusals)
            assert "WRONGPASS" in refusals[0] and factory.size == 0
        finally:
            await factory.disconnect()

        right = parse_redis_url(base.format("node-pw"))
        factory = connect(right, reactor)
        try:
            await eventually(lambda: factory.size)
            assert (await factory.handler.role())[0] == "master"
        finally:
            await factory.disconnect()
    finally:
        sentinel.kill()
        node.kill()


def test_a_connection_lost_while_its_role_is_asked_never_becomes_ready():
    """Before this was so, such a connection joined the pool as if up, and every command sent
    to it waited for its reply timeout (seen as a server and a worker that stopped answering
    after a failover)."""
    from twisted.internet.error import ConnectionLost
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from circles.backend.sentinel import PrimaryProtocol

    ready = []
    protocol = PrimaryProtocol(charset="utf-8", convertNumbers=False)
    protocol.whenConnected().addCallback(ready.append)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value() == b"*1\r\n$4\r\nROLE\r\n"
    protocol.connectionLost(Failure(ConnectionLost()))
    assert not ready and not protocol.connected

    # The same check answered "master" makes it ready; "slave" closes it.
    for role, expected in ((b"master", True), (b"slave", False)):
        ready.clear()
        protocol = PrimaryProtocol(charset="utf-8", convertNumbers=False)
        protocol.whenConnected().addCallback(ready.append)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"*3\r\n$%d\r\n%s\r\n:0\r\n*0\r\n" % (len(role), role))
        assert bool(ready) is expected and transport.disconnecting is not expected


class ConfiguredRedis(RedisProcess):
    """A node started from a configuration file of its own, as in production (``CONFIG REWRITE``
    needs one), with ``lines`` added."""

    def __init__(self, directory: str, lines: list[str]) -> None:
        super().__init__(directory)
        os.makedirs(directory, exist_ok=True)
        self.config = os.path.join(directory, f"redis-{self.port}.conf")
        with open(self.config, "w") as f:
            f.write("\n".join([f"port {self.port}", "bind 127.0.0.1", f"dir {directory}", 'save ""',
                               "appendonly no", *lines]) + "\n")

    def command(self) -> list[str]:
        return [REDIS_SERVER, self.config]


def _ask(process, *command):
    client = process.client()
    try:
        return client(*command)
    finally:
        client.close()


def _fields(text: str) -> dict:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _pairs(flat: list) -> dict:
    return dict(zip(flat[0::2], flat[1::2]))


def _in_sync(node) -> bool:
    """deployment.md's step 2: ``INFO replication`` shows the link up and no sync in progress."""
    info = _fields(_ask(node, "INFO", "replication"))
    return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == "0"


def _demoted(node) -> bool:
    """A primary made a replica by SENTINEL FAILOVER, and in sync with the new one. Sentinel
    kills the normal clients of the primary it demotes (CLIENT KILL TYPE normal, with its
    REPLICAOF), so that they go to the new one: a poll's connection killed so is "not yet"."""
    try:
        return _fields(_ask(node, "INFO", "replication")).get("role") == "slave" and _in_sync(node)
    except ConnectionError:
        return False


def _knows_again(redis, sentinel, replicas: list) -> bool:
    """A Sentinel after SENTINEL RESET: it knows the other Sentinels and the replicas again."""
    master = _pairs(_ask(sentinel, "SENTINEL", "MASTER", redis.master))
    listed = {int(_pairs(r)["port"]): _pairs(r) for r in _ask(sentinel, "SENTINEL", "REPLICAS", redis.master)}
    return (int(master["num-other-sentinels"]) == len(redis.sentinels) - 1
            and sorted(listed) == sorted(node.port for node in replicas)
            and all(r["master-link-status"] == "ok" for r in listed.values()))


async def _replace_replica(redis, tmp_path, name: str, old, primary) -> RedisProcess:
    """docs/deployment.md, "To replace or upgrade a replica", step by step."""
    new = ConfiguredRedis(str(tmp_path / name), [f"replicaof 127.0.0.1 {primary.port}", "replica-priority 0"])
    new.start()  # 1. a replica that cannot be elected yet
    redis.nodes.append(new)
    await eventually(lambda: _in_sync(new))  # 2.
    assert _ask(new, "CONFIG", "SET", "replica-priority", "100") == "OK"  # 3.
    assert _ask(new, "CONFIG", "REWRITE") == "OK"
    with open(new.config) as f:
        assert "replica-priority 0" not in f.read()  # it stays electable after a restart
    try:
        _ask(old, "SHUTDOWN")  # 4.
    except ConnectionError:  # it closes the connection as it stops
        pass
    old.process.wait(30)
    for sentinel in redis.sentinels:  # 5. in turn, each knowing everything again before the next
        assert _ask(sentinel, "SENTINEL", "RESET", redis.master) == 1
        await eventually(lambda: _knows_again(redis, sentinel, [new]), timeout=60)  # noqa: B023
    assert _ask(redis.sentinels[0], "SENTINEL", "CKQUORUM", redis.master).startswith("OK")
    return new


@pytest_twisted.ensureDeferred
async def test_the_primary_is_replaced_as_deployment_md_says_and_plays_go_on(tmp_path, start):
    """docs/deployment.md, "Upgrading without dropping anyone", Redis nodes: the primary made a
    replica by SENTINEL FAILOVER, then replaced as a replica is (every command of both
    procedures), with a server and a worker following the Sentinels throughout: each step's check
    holds, the Sentinels end knowing only the nodes there are, and plays run on the new primary."""
    redis = ReplicatedRedis(str(tmp_path / "redis"))
    redis.start()
    try:
        runner = start(runner_for(redis))
        worker = start(worker_for(redis))
        await eventually(runner.is_connected)
        await eventually(lambda: worker.registered)
        old, replica = redis.nodes
        for node in redis.nodes:  # the sync delay lowered, as deployment.md suggests when replicas come back one at a time
            assert _ask(node, "CONFIG", "SET", "repl-diskless-sync-delay", "0") == "OK"
        assert json.loads(await runner.run(request("before")))["script"] == "before"

        await eventually(lambda: _in_sync(replica))  # 1.
        assert _ask(redis.sentinels[0], "SENTINEL", "FAILOVER", redis.master) == "OK"  # 2.
        await eventually(lambda: _ask(redis.sentinels[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", redis.master)
                         == ["127.0.0.1", str(replica.port)], timeout=30)  # 3.
        await eventually(lambda: _demoted(old), timeout=30)
        new = await _replace_replica(redis, tmp_path, "new", old, primary=replica)  # 4. now a replica

        await eventually(lambda: runner.is_connected() and port_of(runner._commands) == replica.port)
        await eventually(lambda: live_on(replica, worker))
        output = json.loads(await runner.run(request("after")))
        assert output["script"] == "after"
        assert _ask(replica, "HGET", f"circles:task:{output['task_id']}", "status") == "completed"
        for sentinel in redis.sentinels:
            assert _knows_again(redis, sentinel, [new])
    finally:
        redis.stop()
