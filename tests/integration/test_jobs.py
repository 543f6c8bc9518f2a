"""The hero contract's jobs methods through real things: a redis-server, the store in it
(circles.server.jobs.redis_store), servers (CirclesService) with workers (the tiny engine, which runs
Rhai), and WebSocket clients that offer the subprotocol ``circles-hero.v1``.

The rules themselves, on a Clock, are tests/unit/test_jobs.py.
"""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import reactor

from circles import CirclesService, Config
from circles.backend import members
from circles.backend.redis import connect
from circles.backend.redis_url import parse_redis_url
from circles.common.wire import JOB_NOT_FOUND, JOB_STATE, NOT_A_MEMBER, SUBPROTOCOLS, TOO_MANY_REQUESTS
from circles.server.jobs import model
from circles.server.jobs.model import Outcome, Table, TooManyJobs, new_job_id
from circles.server.jobs.redis_store import RedisJobStore
from circles.worker.service import Worker
from circles.worker.tiny_engine import run as tiny_engine

from ..play_client import RPCClient, eventually, new_key, pk, sleep

HERO = [SUBPROTOCOLS["hero"]]
CIRCLE = pk(new_key())  # served by a worker running the tiny engine
IDLE = pk(new_key())  # a worker that is alive but takes no task: jobs there stay started


async def serve(start, redis_url: str, **config) -> tuple[CirclesService, int]:
    config.setdefault("circles", [CIRCLE, IDLE])
    config.setdefault("drain_grace", 0.0)
    service = start(CirclesService(Config(listen=("tcp:0:interface=127.0.0.1",), redis_url=redis_url, **config),
                                   reactor=reactor))
    [port] = await service.when_listening()
    await eventually(service.script_runner.is_connected)
    await eventually(service.job_store.is_connected)
    return service, port.getHost().port


async def tiny_worker(start, redis_url: str) -> Worker:
    worker = start(Worker(parse_redis_url(redis_url), [CIRCLE], tiny_engine, reactor=reactor, concurrency=4))
    await eventually(lambda: worker.registered)
    return worker


async def hero(port: int, key, circle: str = CIRCLE) -> RPCClient:
    """A hero client, authenticated as ``key``."""
    client = await RPCClient.open(port, circle, HERO)
    assert client.protocol.websocket_protocol_in_use == HERO[0]
    await client.authenticate(key)
    return client


def tasks_of(redis_client, script: str) -> list:
    """The keys of the tasks (plays handed to workers) of ``script``."""
    return [key for key in redis_client("KEYS", "circles:task:*") if redis_client.hgetall(key).get("script") == script]


async def result(client: RPCClient, method: str, params=None):
    reply = await client.call(method, params)
    assert "result" in reply, (method, reply)
    return reply["result"]


async def error(client: RPCClient, method: str, params=None) -> dict:
    reply = await client.call(method, params)
    assert "error" in reply, (method, reply)
    return reply["error"]


async def ended(client: RPCClient, job_id: str) -> dict:
    """The job's status once it has ended (asked every 50 ms, for 30 s at most)."""
    for _ in range(600):
        status = await result(client, "get_job_status", [job_id])
        if status["status"] in model.ENDED:
            return status
        await sleep(0.05)
    raise AssertionError(f"job {job_id} did not end: {status}")


@pytest_twisted.ensureDeferred
async def test_a_hero_client_uses_every_jobs_method_end_to_end(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url, auth_required=True)
    await tiny_worker(start, redis_server.url)
    redis_client.pretend_worker(IDLE)
    alice = new_key()
    client = await hero(port, alice)

    # create, look, start, read
    job_id = await result(client, "create_job", {"job": {
        "caller_id": pk(alice), "context_id": CIRCLE, "script": 'print("hello " + CALLER_ID); 6 * 7',
        "script_type": "rhai", "timeout": 10}})
    status = await result(client, "get_job_status", [job_id])
    assert (status["status"], status["caller_id"], status["context_id"]) == ("created", pk(alice), CIRCLE)
    assert (await error(client, "get_job_output", [job_id]))["code"] == JOB_STATE
    assert await result(client, "start_job", [job_id]) == {"success": True}
    status = await ended(client, job_id)
    assert status["status"] == "finished" and status["started_at"] and status["ended_at"]
    output = await result(client, "get_job_output", [job_id])
    assert output.split() == ["hello", pk(alice), "42"]
    assert await result(client, "get_job_logs", [job_id]) == output.splitlines()

    # prerequisites: the dependent waits, then runs; a failure fails its dependents, naming it
    first = await result(client, "create_job", {"job": {"script": "1 + 1", "script_type": "rhai"}})
    second = await result(client, "create_job", {"job": {"script": "40 + 2", "script_type": "Rhai",
                                                         "prerequisites": [first]}})
    await result(client, "start_job", [second])
    assert (await result(client, "get_job_status", [second]))["status"] == "dispatched"
    await result(client, "start_job", [first])
    assert (await ended(client, second))["status"] == "finished"
    assert (await result(client, "get_job_output", [second])).strip() == "42"
    assert (await result(client, "get_job_status", [first]))["dependents"] == [second]
    failing = await result(client, "create_job", {"job": {"script": 'print("before"); let y = 1 / 0;',
                                                          "script_type": "rhai"}})
    dependent = await result(client, "create_job", {"job": {"script": "1", "script_type": "rhai",
                                                            "prerequisites": [failing]}})
    await result(client, "start_job", [dependent])
    await result(client, "start_job", [failing])
    failed = await ended(client, failing)
    assert failed["status"] == "error" and "division by zero" in failed["error"]
    reply = await error(client, "get_job_output", [failing])
    assert reply["code"] == -32005 and "division by zero" in reply["data"]["error"]
    assert reply["data"]["output"].strip() == "before"
    logs = await result(client, "get_job_logs", [failing])
    assert logs[0] == "before" and logs[-1].startswith("error: ") and "division by zero" in logs[-1]
    blocked = await ended(client, dependent)
    assert blocked["status"] == "error" and blocked["error"].startswith(f"prerequisite {failing} failed: ")

    # run_job: its output, and its job gone once answered
    total = (await result(client, "list_jobs"))["total"]
    assert (await result(client, "run_job", {"script": "let x = 10; x * 2", "script_type": "rhai"})).strip() == "20"
    assert (await result(client, "run_job", ["1 + 2", "rhai", [second]])).strip() == "3"
    assert (await result(client, "list_jobs"))["total"] == total

    # stop_job: the play's task is expired (the idle circle's worker never takes it)
    idle = await hero(port, alice, IDLE)
    waiting = await result(idle, "create_job", {"job": {"script": "never", "script_type": "rhai"}})
    await result(idle, "start_job", [waiting])
    [task] = await eventually(lambda: tasks_of(redis_client, "never"))
    assert redis_client.hgetall(task)["source"] == "job" and redis_client.hgetall(task)["caller"] == pk(alice)
    assert await result(idle, "stop_job", [waiting]) == {"success": True}
    await eventually(lambda: redis_client.hgetall(task).get("status") == "expired")
    assert (await result(idle, "get_job_status", [waiting]))["status"] == "stopped"
    assert (await error(idle, "stop_job", [waiting]))["code"] == JOB_STATE

    # list, delete, clear: this circle's jobs only
    listed = await result(client, "list_jobs", {"limit": 2})
    assert listed["total"] == 5 and [job["job_id"] for job in listed["jobs"]] == [job_id, first]
    assert await result(client, "delete_job", [job_id]) == {"success": True}
    assert (await error(client, "get_job_status", [job_id]))["code"] == JOB_NOT_FOUND
    assert await result(client, "clear_all_jobs") == {"success": True, "deleted": 4}
    assert (await result(idle, "list_jobs"))["total"] == 1  # the other circle's job stays
    assert redis_client("KEYS", "circles:job:*") == [f"circles:job:{waiting}"]
    client.close()
    idle.close()


@pytest_twisted.ensureDeferred
async def test_a_second_key_cannot_touch_the_first_keys_jobs(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url)
    await tiny_worker(start, redis_server.url)
    alice_key = new_key()
    alice, mallory = await hero(port, alice_key), await hero(port, new_key())
    created = await result(alice, "create_job", {"job": {"script": "1", "script_type": "rhai"}})
    finished = await result(alice, "create_job", {"job": {"script": "2", "script_type": "rhai"}})
    await result(alice, "start_job", [finished])
    await ended(alice, finished)
    never = new_job_id()
    for job_id in (created, finished, never):
        for method in ("start_job", "get_job_status", "get_job_output", "get_job_logs", "stop_job", "delete_job"):
            refused = await error(mallory, method, [job_id])
            assert (refused["code"], refused["message"]) == (JOB_NOT_FOUND, "Job not found"), (method, refused)
    assert (await error(mallory, "create_job", {"job": {"script": "1", "script_type": "rhai",
                                                        "prerequisites": [created]}}))["code"] == -32602
    assert (await error(mallory, "create_job", {"job": {"script": "1", "script_type": "rhai",
                                                        "caller_id": pk(alice_key)}}))["code"] == -32602
    assert await result(mallory, "list_jobs") == {"jobs": [], "total": 0}
    assert await result(mallory, "clear_all_jobs") == {"success": True, "deleted": 0}
    assert (await result(alice, "get_job_status", [created]))["status"] == "created"
    assert (await result(alice, "get_job_output", [finished])).strip() == "2"
    # no key was made of what mallory sent
    assert not [key for key in redis_client("KEYS", "*") if never in key]
    alice.close()
    mallory.close()


@pytest_twisted.ensureDeferred
async def test_a_job_outlives_its_connection_and_is_stopped_from_another_server_process(redis_server, start,
                                                                                          redis_client):
    """Two server processes on one Redis: a job started through one, whose connection then closes,
    is seen through the other, which stops it; the first, running it, finds out at its next look
    and stops its play (the task expired)."""
    one, port_one = await serve(start, redis_server.url)
    two, port_two = await serve(start, redis_server.url)
    redis_client.pretend_worker(IDLE)
    key = new_key()
    first = await hero(port_one, key, IDLE)
    job_id = await result(first, "create_job", {"job": {"script": "never", "script_type": "rhai"}})
    await result(first, "start_job", [job_id])
    first.close()
    await eventually(lambda: one.gateway.jobs.running == 1)
    [task] = await eventually(lambda: tasks_of(redis_client, "never"))
    second = await hero(port_two, key, IDLE)
    assert (await result(second, "get_job_status", [job_id]))["status"] == "started"
    assert await result(second, "stop_job", [job_id]) == {"success": True}
    await eventually(lambda: one.gateway.jobs.running == 0)
    await eventually(lambda: redis_client.hgetall(task).get("status") == "expired")
    assert (await result(second, "get_job_status", [job_id]))["status"] == "stopped"
    second.close()


@pytest_twisted.ensureDeferred
async def test_bounds_hold_against_a_caller_creating_jobs_in_a_loop(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url, max_jobs_per_caller=5, max_jobs=8)
    key = new_key()
    client = await hero(port, key)
    made = [await result(client, "create_job", {"job": {"script": f"{i}", "script_type": "rhai"}}) for i in range(5)]
    for _ in range(20):
        refused = await error(client, "create_job", {"job": {"script": "x", "script_type": "rhai"}})
        assert refused["code"] == TOO_MANY_REQUESTS and refused["data"] == {"max_jobs_per_caller": 5}
    assert len(redis_client("KEYS", "circles:job:*")) == 5 and redis_client("ZCARD", "circles:jobs") == 5
    # keys are free to make: the server's bound holds them all
    others = [await hero(port, new_key()) for _ in range(2)]
    assert await result(others[0], "create_job", {"job": {"script": "1", "script_type": "rhai"}})
    assert await result(others[0], "create_job", {"job": {"script": "1", "script_type": "rhai"}})
    assert await result(others[1], "create_job", {"job": {"script": "1", "script_type": "rhai"}})
    full = await error(others[1], "create_job", {"job": {"script": "1", "script_type": "rhai"}})
    assert full["code"] == TOO_MANY_REQUESTS and full["data"] == {"max_jobs": 8}
    assert len(redis_client("KEYS", "circles:job:*")) == 8
    await result(client, "delete_job", [made[0]])
    assert await result(others[1], "create_job", {"job": {"script": "1", "script_type": "rhai"}})
    # every key of a job expires with it (--job-ttl, a day by default)
    for job_key in redis_client("KEYS", "circles:job:*") + redis_client("KEYS", "circles:jobs:*"):
        assert 0 < redis_client("PTTL", job_key) <= 86_401_000, job_key  # our clock and Redis's agree
    for c in [client, *others]:
        c.close()


@pytest_twisted.ensureDeferred
async def test_a_circle_of_members_takes_jobs_from_its_members_only(redis_server, start):
    service, port = await serve(start, redis_server.url)
    await tiny_worker(start, redis_server.url)
    member, stranger = new_key(), new_key()
    redis = connect(parse_redis_url(redis_server.url), reactor)
    try:
        await redis.deferred
        await members.add(redis.handler, "circles:", CIRCLE, pk(member))
        await members.set_policy(redis.handler, "circles:", CIRCLE, members.MEMBERS)
    finally:
        await redis.disconnect()
    outsider = await hero(port, stranger)
    refused = await error(outsider, "create_job", {"job": {"script": "1", "script_type": "rhai"}})
    assert refused["code"] == NOT_A_MEMBER
    assert (await error(outsider, "run_job", ["1", "rhai"]))["code"] == NOT_A_MEMBER
    inside = await hero(port, member)
    assert (await result(inside, "run_job", ["6 * 7", "rhai"])).strip() == "42"
    outsider.close()
    inside.close()


# --- the store in Redis, alone --------------------------------------------------------------------


def _made(table: Table, caller: str, script: str = "s", ttl: float = 3600.0) -> model.Job:
    return model.create(table, job_id=new_job_id(), caller=caller, circle=CIRCLE, script=script, script_type="rhai",
                        timeout=5.0, ttl=ttl)


@pytest_twisted.ensureDeferred
async def test_the_redis_store_writes_onto_the_version_it_read_and_keys_expire_with_their_jobs(redis_server, start,
                                                                                                 redis_client):
    store = start(RedisJobStore(parse_redis_url(redis_server.url), reactor=reactor, prefix="circles:"))
    await eventually(store.is_connected)
    caller = pk(new_key())
    now = reactor.seconds()
    version, jobs = await store.load(caller)
    assert (version, jobs) == (0, {})
    table = Table(jobs, now)
    job = _made(table, caller, "print(\"héllo\")")
    assert await store.save(caller, 0, table.change(), now, 3600.0, 2) is True
    assert await store.save(caller, 0, table.change(), now, 3600.0, 2) is False  # another change came first
    version, jobs = await store.load(caller)
    assert version == 1 and jobs == {job.id: job}
    assert await store.read(job.id, "script") == "print(\"héllo\")" and await store.read(job.id, "output") is None

    table = Table(jobs, now)
    model.start(table, CIRCLE, job.id)
    model.advance(table)
    model.finish(table, job.id, Outcome(model.FINISHED, "done"))
    assert await store.save(caller, 1, table.change(), now, 3600.0, 2) is True
    assert await store.read(job.id, "output") == "done"
    assert (await store.load(caller))[1][job.id].status == model.FINISHED

    other = Table({}, now)
    _made(other, "someone")
    _made(other, "someone")
    try:
        await store.save("someone", 0, other.change(), now, 3600.0, 2)
        raise AssertionError("the server's bound was passed")
    except TooManyJobs as e:
        assert (e.limit, e.of) == (2, "server")
    assert redis_client("EXISTS", "circles:jobs:someone") == 0  # nothing written

    # a job whose time is up: its keys go, and the next change removes it from the table
    short = Table({}, now)
    gone = _made(short, "brief", ttl=0.3)
    assert await store.save("brief", 0, short.change(), now, 0.3, 0) is True
    await eventually(lambda: redis_client("EXISTS", f"circles:job:{gone.id}") == 0)
    await eventually(lambda: redis_client("EXISTS", "circles:jobs:brief") == 0)
    assert await store.load("brief") == (0, {})

    deleted = Table((await store.load(caller))[1], now)
    model.delete(deleted, CIRCLE, job.id)
    assert await store.save(caller, 2, deleted.change(), now, 3600.0, 2) is True
    assert redis_client("EXISTS", f"circles:job:{job.id}") == 0
    # the expired job is counted until a change that creates one prunes the count
    assert redis_client("ZRANGE", "circles:jobs", 0, -1) == [gone.id]
    fresh = Table({}, reactor.seconds())
    kept = _made(fresh, "fresh")
    assert await store.save("fresh", 0, fresh.change(), reactor.seconds(), 3600.0, 2) is True
    assert redis_client("ZRANGE", "circles:jobs", 0, -1) == [kept.id]


@pytest_twisted.ensureDeferred
async def test_a_job_in_redis_that_is_not_ours_is_left_out(redis_server, start, redis_client):
    store = start(RedisJobStore(parse_redis_url(redis_server.url), reactor=reactor, prefix="circles:"))
    await eventually(store.is_connected)
    redis_client("HSET", "circles:jobs:someone", "_v", "3", new_job_id(), "{not json")
    assert await store.load("someone") == (3, {})
    assert store.unreadable == 1


# --- twistd, as an operator runs it ---------------------------------------------------------------


def test_twistd_with_api_hero_serves_jobs_within_its_job_options(tmp_path):
    """``twistd circles --api hero`` with the job options, a ``twistd circles-worker``, and a hero
    client written with the websockets library (no subprotocol: the server's --api)."""
    from websockets.sync.client import connect as ws_connect

    from ..support import Key, request, twistd

    circle, user = Key(), Key()
    args = ["--api", "hero", "-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1", "--job-ttl", "600",
            "--max-jobs-per-caller", "2", "--max-running-jobs-per-caller", "1", "--max-jobs", "10"]
    with twistd(args, tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--engine", "circles.worker.tiny_engine:run"], tmp_path,
                   plugin="circles-worker") as worker:
        port = server.wait_listening()
        worker.wait_for("waiting for tasks")
        with ws_connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "create_job", {"job": {"script": "1", "script_type": "rhai"}})["error"]["code"] == \
                -32001
            nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]
            assert request(ws, "authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)})["result"]
            job_id = request(ws, "create_job", {"job": {"script": "let x = 10; x * 2", "script_type": "rhai"}})["result"]
            assert request(ws, "start_job", [job_id])["result"] == {"success": True}
            status = None
            for _ in range(300):
                status = request(ws, "get_job_status", [job_id])["result"]
                if status["status"] in ("finished", "error", "stopped"):
                    break
                time.sleep(0.1)
            assert status["status"] == "finished", (status, request(ws, "get_job_output", [job_id]),
                                                    server.output[-4000:], worker.output[-4000:])
            assert status["expires_at"] > status["created_at"]
            assert request(ws, "get_job_output", [job_id])["result"].strip() == "20"
            assert request(ws, "run_job", {"script": "6 * 7", "script_type": "rhai"})["result"].strip() == "42"
            request(ws, "create_job", {"job": {"script": "1", "script_type": "rhai"}})
            refused = request(ws, "create_job", {"job": {"script": "1", "script_type": "rhai"}})["error"]
            assert refused["code"] == -32006 and refused["data"] == {"max_jobs_per_caller": 2}
            described = request(ws, "rpc.discover")["result"]
            assert {"create_job", "run_job", "clear_all_jobs"} <= {m["name"] for m in described["methods"]}
    assert "Traceback" not in server.output
