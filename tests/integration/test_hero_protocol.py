"""The hero dispatcher protocol, both ways, against a real redis-server.

Our server (``--worker-protocol hero``) with a worker written from the documented protocol alone
(tests/hero_reference_worker.py, redis-py, nothing of circles); and a dispatcher written here
from the same document (redis-py: HSET the job, LPUSH its id) with our worker
(``circles-worker --worker-protocol hero``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
import redis
from twisted.internet import reactor, threads
from websockets.sync.client import connect as ws_connect

from circles import CirclesService, Config
from circles.backend import tasks
from circles.backend.hero import HERO
from circles.backend.init_scripts import InitScript, once_key
from circles.backend.job_dispatch import SWEEP_FALLBACK, JobScriptRunner
from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import ScriptRequest
from circles.common.wire import SUBPROTOCOLS
from circles.worker.engines import ExecEngine
from circles.worker.job_worker import JobWorker
from devtools.twistd import Twistd

from ..play_client import RPCClient, eventually, new_key, pk, sleep
from ..support import Key, authenticate, eventually_true, request

TESTS = Path(__file__).resolve().parents[1]
CIRCLE_KEY = new_key()
CIRCLE = pk(CIRCLE_KEY)
#: The fields hero documents for a job hash, less those the worker writes (output, error) and
#: the optional ones we leave out (log_path, dependencies: docs/worker-protocol.md says why).
DISPATCHER_FIELDS = {"id", "caller_id", "worker_id", "context_id", "script", "timeout", "retries", "concurrent",
                     "created_at", "updated_at", "status", "env_vars", "prerequisites", "dependents"}
ISO_8601 = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


class ReferenceWorker:
    """tests/hero_reference_worker.py as a process; its stdout lines, read in a thread."""

    def __init__(self, redis_server, circle: str = CIRCLE, *options: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(TESTS / "hero_reference_worker.py"),
                                      "--port", str(redis_server.port), "--circle", circle, *options],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def said(self, *words: str) -> list[str]:
        """The lines that start with ``words``."""
        start = " ".join(words)
        return [line for line in self.lines if line == start or line.startswith(start + " ")]

    def job(self, job_id: str) -> dict:
        """The job's hash as the worker read it when it took the job."""
        [line] = self.said("job", job_id)
        return json.loads(line.split(" ", 2)[2])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def reference_worker(redis_server):
    workers: list[ReferenceWorker] = []

    def start(*options: str, circle: str = CIRCLE) -> ReferenceWorker:
        worker = ReferenceWorker(redis_server, circle, *options)
        workers.append(worker)
        eventually_true(lambda: worker.said("ready"), timeout=30)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def hero_redis(redis_server):
    """redis-py on the test's redis-server: the dispatcher's and the inspector's client."""
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    yield client
    client.close()


async def serve(start, redis_server, **config) -> tuple[CirclesService, int]:
    config.setdefault("circles", [CIRCLE])
    config.setdefault("drain_grace", 0.0)
    service = start(CirclesService(Config(listen=("tcp:0:interface=127.0.0.1",), redis_url=redis_server.url,
                                          worker_protocol="hero", **config), reactor=reactor))
    [port] = await service.when_listening()
    await eventually(service.script_runner.is_connected)
    return service, port.getHost().port


def play(client, script, **params):
    return client.call("play", {"script": script, **params})


def hero_keys(client) -> list[str]:
    return sorted(client.keys("hero:*"))


# -- our server, a worker written from the document --------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_play_is_run_by_a_worker_of_the_documented_protocol(redis_server, start, reference_worker,
                                                                     hero_redis):
    service, port = await serve(start, redis_server, auth_required=True)
    assert isinstance(service.script_runner, JobScriptRunner)
    assert service.script_runner.notifications  # turned on: CONFIG SET notify-keyspace-events
    assert set("Khl") <= set(hero_redis.config_get("notify-keyspace-events")["notify-keyspace-events"])
    worker = reference_worker()
    client = await RPCClient.open(port, CIRCLE)
    caller = await client.authenticate(new_key())
    reply = await play(client, "40 + 2", timeout=7.5)
    assert reply["result"] == {"output": "42"}
    [line] = await eventually(lambda: worker.said("job"))  # its stdout, read in a thread
    job_id = line.split()[1]
    job = worker.job(job_id)
    # Every field the dispatcher writes, as the worker read it.
    assert DISPATCHER_FIELDS <= set(job), DISPATCHER_FIELDS - set(job)
    assert uuid.UUID(job["id"]).version == 4 and job["id"] == job_id
    assert (job["caller_id"], job["worker_id"], job["context_id"]) == (caller, CIRCLE, CIRCLE)
    assert (job["script"], job["timeout"], job["status"]) == ("40 + 2", "8", "dispatched")
    assert (job["retries"], job["concurrent"], job["prerequisites"], job["dependents"]) == ("0", "false", "[]", "[]")
    assert json.loads(job["env_vars"]) == {"CIRCLES_SOURCE": "ws"}
    assert re.match(ISO_8601, job["created_at"]) and job["created_at"] == job["updated_at"]
    # Once read, what is large is gone and the rest lives seconds; the reply list (pushed by this
    # worker after its HSET, so after the server read the result) lives no longer than the worker set.
    left = hero_redis.hgetall(f"hero:job:{job_id}")
    assert left["status"] == "finished" and not {"script", "output", "error", "env_vars"} & set(left)
    assert 0 < hero_redis.ttl(f"hero:job:{job_id}") <= tasks.STATUS_TTL
    await eventually(lambda: hero_redis.ttl(f"hero:reply:{job_id}") != -1)  # its LPUSH, then its EXPIRE
    assert hero_redis.ttl(f"hero:reply:{job_id}") in (-2, *range(1, 301))
    assert hero_redis.llen(f"hero:work_queue:{CIRCLE}") == 0
    # A waiting play learns its result from a notification, not from a sweep.
    assert service.script_runner.notified >= 1
    client.close()


@pytest_twisted.ensureDeferred
async def test_the_callers_context_reaches_the_script(redis_server, start, reference_worker):
    _, port = await serve(start, redis_server)
    reference_worker()
    client = await RPCClient.open(port, CIRCLE)
    assert (await play(client, "caller()"))["result"] == {"output": ""}  # anonymous
    caller = await client.authenticate(new_key())
    assert (await play(client, "caller()"))["result"] == {"output": caller}
    assert (await play(client, "context()"))["result"] == {"output": CIRCLE}
    assert (await play(client, "env(CIRCLES_SOURCE)"))["result"] == {"output": "ws"}
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_failed_job_is_a_script_error(redis_server, start, reference_worker):
    _, port = await serve(start, redis_server)
    worker = reference_worker()
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "fail(no such function: frobnicate)")
    assert reply["error"]["code"] == -32005
    assert reply["error"]["data"] == "no such function: frobnicate"
    await eventually(lambda: worker.said("failed"))
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_timeout_is_32003_and_sends_a_stop_request(redis_server, start, reference_worker, hero_redis):
    _, port = await serve(start, redis_server)
    worker = reference_worker()
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "sleep(20)", timeout=1)
    assert reply["error"]["code"] == -32003
    [line] = await eventually(lambda: worker.said("job"))  # its stdout, read in a thread
    job_id = line.split()[1]
    # The worker read the stop request, the job id, and stopped its job.
    await eventually(lambda: worker.said("stopped", job_id))
    assert worker.said("stop", job_id)
    job = hero_redis.hgetall(f"hero:job:{job_id}")
    assert job["status"] == "error" and "script" not in job
    assert 0 < hero_redis.ttl(f"hero:job:{job_id}") <= tasks.STATUS_TTL
    client.close()


@pytest_twisted.ensureDeferred
async def test_the_stop_request_is_the_job_id_on_the_circles_stop_queue(redis_server, start, reference_worker,
                                                                       hero_redis):
    _, port = await serve(start, redis_server)
    worker = reference_worker("--ignore-stops")
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "sleep(3)", timeout=1)
    assert reply["error"]["code"] == -32003
    [line] = await eventually(lambda: worker.said("job"))  # its stdout, read in a thread
    job_id = line.split()[1]
    assert hero_redis.lrange(f"hero:stop_queue:{CIRCLE}", 0, -1) == [job_id]
    assert 0 < hero_redis.ttl(f"hero:stop_queue:{CIRCLE}") <= tasks.TASK_TTL
    job = hero_redis.hgetall(f"hero:job:{job_id}")
    assert (job["status"], job["reason"]) == ("error", "stopped")
    assert "timed out after 1s" in job["error"]
    # A worker that ignores the stop and finishes later: nobody waits, nothing breaks.
    await eventually(lambda: worker.said("finished", job_id), timeout=30)
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_client_that_disconnects_sends_a_stop_request(redis_server, start, reference_worker):
    service, port = await serve(start, redis_server)
    worker = reference_worker()
    client = await RPCClient.open(port, CIRCLE)
    play(client, "sleep(20)", timeout=20)
    await eventually(lambda: worker.said("job"))
    job_id = worker.said("job")[0].split()[1]
    await eventually(lambda: service.script_runner.in_flight == 1)
    client.close()
    await eventually(lambda: worker.said("stopped", job_id))
    assert service.script_runner.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_no_worker_means_the_play_waits_for_its_timeout(redis_server, start, hero_redis):
    # Hero workers do not register: nothing tells the server none serves the circle.
    service, port = await serve(start, redis_server)
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "40 + 2", timeout=1)
    assert reply["error"]["code"] == -32003
    # No worker took it: its id is off the queue, and no stop request was sent.
    assert hero_redis.llen(f"hero:work_queue:{CIRCLE}") == 0
    assert not hero_redis.exists(f"hero:stop_queue:{CIRCLE}")
    [key] = hero_redis.keys("hero:job:*")
    assert hero_redis.hget(key, "status") == "error"
    # /metrics: the queue's length, no live-worker count for the circle (none is known).
    await eventually(lambda: CIRCLE in service.script_runner.housekeeping.circle_stats)
    metrics = service.gateway.metrics.exposition().decode()
    assert f'circles_queue_length{{circle="{CIRCLE}"}} 0.0' in metrics
    assert f'circles_workers{{circle="{CIRCLE}"}}' not in metrics
    assert "circles_dead_letters " not in metrics
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_script_over_the_size_cap_writes_nothing(redis_server, start, hero_redis):
    _, port = await serve(start, redis_server, max_script_size=100)
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "1 + " * 50 + "1")
    assert reply["error"]["code"] == -32006
    assert hero_keys(hero_redis) == []
    client.close()


@pytest_twisted.ensureDeferred
async def test_redis_gone_is_32004(redis_server, start):
    service, port = await serve(start, redis_server)
    client = await RPCClient.open(port, CIRCLE)
    redis_server.kill()
    await eventually(lambda: not service.script_runner.is_connected())
    reply = await play(client, "40 + 2")
    assert reply["error"]["code"] == -32004
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_webhook_event_is_a_job_with_its_data(redis_server, start, hero_redis):
    runner = start(JobScriptRunner(parse_redis_url(redis_server.url), schema=HERO, reactor=reactor))
    await eventually(runner.is_connected)
    event = ScriptRequest(circle=CIRCLE, script="on_stripe_event(CIRCLES_DATA)", caller="", source="webhook:stripe",
                          timeout=86400)
    body = '{"id": "evt_1", "type": "charge.succeeded"}'
    queued = await runner.enqueue_once(event, body, f"stripe:{CIRCLE}:abc", 60)
    again = await runner.enqueue_once(event, body, f"stripe:{CIRCLE}:abc", 60)
    assert not queued.duplicate and again.duplicate and again.task_id == queued.task_id
    job = hero_redis.hgetall(f"hero:job:{queued.task_id}")
    assert json.loads(job["env_vars"]) == {"CIRCLES_SOURCE": "webhook:stripe", "CIRCLES_DATA": body}
    assert (job["caller_id"], job["context_id"], job["timeout"], job["status"]) == ("", CIRCLE, "86400", "dispatched")
    assert hero_redis.lrange(f"hero:work_queue:{CIRCLE}", 0, -1) == [queued.task_id]
    assert hero_redis.ttl(f"hero:work_queue:{CIRCLE}") == -1  # the workers' list: no TTL of ours
    assert 86400 < hero_redis.ttl(f"hero:job:{queued.task_id}") <= 86400 + tasks.TASK_TTL
    # What an operator sees: the hero queue, workers and dead letters unknown (none registers).
    stats = await threads.deferToThread(
        subprocess.run, [sys.executable, "-m", "circles", "tasks", "stats", "--worker-protocol", "hero", "--json",
                         "--redis-url", redis_server.url], capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) == {"circles": [{"circle": CIRCLE, "workers": None, "queue": 1, "dead": None}],
                                        "dead_letters": None}
    text = await threads.deferToThread(
        subprocess.run, [sys.executable, "-m", "circles", "tasks", "stats", "--worker-protocol", "hero",
                         "--redis-url", redis_server.url], capture_output=True, text=True, timeout=60)
    assert text.stdout.split("\n")[1].split() == [CIRCLE, "-", "1", "-"]
    assert "workers: not known in the hero protocol" in text.stdout


@pytest_twisted.ensureDeferred
async def test_without_notifications_a_sweep_finds_the_result(redis_server, start, reference_worker, hero_redis):
    # A Redis that refuses CONFIG (an ACL here, a managed Redis elsewhere): the sweep is all there is.
    hero_redis.config_set("notify-keyspace-events", "")
    hero_redis.execute_command("ACL", "SETUSER", "noconfig", "on", ">secret", "~*", "&*", "+@all", "-config")
    url = f"redis://noconfig:secret@127.0.0.1:{redis_server.port}/0"
    runner = start(JobScriptRunner(parse_redis_url(url), schema=HERO, reactor=reactor))
    await eventually(runner.is_connected)
    assert not runner.notifications
    reference_worker()
    output = await runner.run(ScriptRequest(circle=CIRCLE, script="6 * 7", caller="", source="ws", timeout=10))
    assert output == "42"
    assert runner.notified == 0 and runner.sweeps >= 1
    assert SWEEP_FALLBACK < 1


@pytest_twisted.ensureDeferred
async def test_many_plays_wait_without_a_command_per_play_per_tick(redis_server, start, hero_redis):
    # 500 plays waiting with no worker: over 3 s the runner sends a sweep step every 5 s and a
    # PING a second, not a read per play per tick.
    runner = start(JobScriptRunner(parse_redis_url(redis_server.url), schema=HERO, reactor=reactor))
    await eventually(runner.is_connected)
    plays = [runner.run(ScriptRequest(circle=CIRCLE, script="1", caller="", source="ws", timeout=30))
             for _ in range(500)]
    for d in plays:
        d.addErrback(lambda _: None)
    await eventually(lambda: hero_redis.llen(f"hero:work_queue:{CIRCLE}") == 500)
    # The one read each play's own write notified (a play costs about three reads in all): all
    # sent once every notification came, and answered once Redis's count stops moving.
    await eventually(lambda: runner.notified >= 500)

    def commands() -> int:
        return int(hero_redis.info("stats")["total_commands_processed"])

    before = commands()
    for _ in range(60):
        await sleep(0.5)
        before, settled = commands(), before
        if before - settled < 10:
            break
    # Two windows of 3 s at most: on a busy machine the last notified reads may land in the
    # first (the count stood still while this process was not running); a read per play per tick
    # would fill both.
    spent: list = []
    while len(spent) < 2 and not (spent and spent[-1] < 50):
        before = commands()
        await sleep(3)
        spent.append(commands() - before)
    assert spent[-1] < 50, spent  # PINGs (health, subscriber), one sweep step at most; 500 per tick: 1,500+
    for d in plays:
        d.cancel()


def test_twistd_circles_with_the_hero_protocol_serves_plays(redis_server, reference_worker, tmp_path, hero_redis):
    # A real twistd circles --worker-protocol hero, a WebSocket client, the reference worker.
    server = Twistd(["--worker-protocol", "hero", "--auth", "--redis-url", redis_server.url, "-k", CIRCLE,
                     "--listen", "tcp:0:interface=127.0.0.1"], tmp_path)
    try:
        server.wait_for("connected to Redis")
        port = server.wait_listening()
        reference_worker()
        key = Key()
        with ws_connect(f"ws://127.0.0.1:{port}/{CIRCLE}") as ws:
            assert authenticate(ws, key)["result"]["authenticated"]
            assert request(ws, "play", {"script": "40 + 2"}) == {"jsonrpc": "2.0", "id": 1, "result": {"output": "42"}}
            reply = request(ws, "play", {"script": "sleep(10)", "timeout": 1}, id_=2)
            assert reply["error"]["code"] == -32003
        assert "the hero dispatcher protocol" in server.output
    finally:
        code = server.stop()
    assert code == -signal.SIGTERM, server.output  # stopped as a service manager stops it
    assert "Traceback" not in server.output


# -- a dispatcher written from the document, our worker ------------------------------------------

def dispatch(client: redis.Redis, script: str, *, timeout: int = 30, circle: str = CIRCLE,
             env: dict | None = None) -> str:
    """What a hero dispatcher does, as documented: write the job hash, LPUSH its id."""
    job_id = str(uuid.uuid4())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    client.hset(f"hero:job:{job_id}", mapping={
        "id": job_id, "caller_id": "02" + "ab" * 32, "worker_id": circle, "context_id": circle, "script": script,
        "timeout": str(timeout), "retries": "0", "concurrent": "false", "created_at": stamp, "updated_at": stamp,
        "status": "dispatched", "env_vars": json.dumps(env or {}), "prerequisites": "[]", "dependents": "[]"})
    client.lpush(f"hero:work_queue:{circle}", job_id)
    return job_id


def our_worker(redis_server, tmp_path, *options: str) -> Twistd:
    worker = Twistd(["--worker-protocol", "hero", "--redis-url", redis_server.url, "-k", CIRCLE,
                     "--exec", "sh {script_file}", *options], tmp_path, plugin="circles-worker")
    worker.wait_for("waiting for jobs")
    return worker


def test_our_worker_runs_a_hero_dispatchers_job(redis_server, tmp_path, hero_redis):
    worker = our_worker(redis_server, tmp_path)
    try:
        job_id = dispatch(hero_redis, 'echo $((40 + 2)); echo "$CALLER_ID $CONTEXT_ID $CIRCLES_SOURCE"')
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{job_id}", "status") == "finished", timeout=30)
        job = hero_redis.hgetall(f"hero:job:{job_id}")
        assert job["output"] == f"42\n{'02' + 'ab' * 32} {CIRCLE} hero"
        assert re.match(ISO_8601, job["updated_at"]) and job["updated_at"] >= job["created_at"]
        # The reply: the job id on hero:reply:{id}, which expires.
        assert hero_redis.lrange(f"hero:reply:{job_id}", 0, -1) == [job_id]
        assert 0 < hero_redis.ttl(f"hero:reply:{job_id}") <= tasks.TASK_TTL
        failed = dispatch(hero_redis, "echo before; exit 3")
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{failed}", "status") == "error", timeout=30)
        job = hero_redis.hgetall(f"hero:job:{failed}")
        assert "exit status 3" in job["error"] and job["output"] == "before"
    finally:
        assert worker.stop() == -signal.SIGTERM, worker.output
    assert "Traceback" not in worker.output


def test_our_worker_runs_hero_jobs_with_an_isolated_engine(redis_server, tmp_path, hero_redis):
    # --engine under --isolation process (the default): the same engine path as our protocol's.
    worker = Twistd(["--worker-protocol", "hero", "--redis-url", redis_server.url, "-k", CIRCLE,
                     "--engine", "circles.worker.tiny_engine:run", "--script-timeout", "2"], tmp_path,
                    plugin="circles-worker")
    try:
        worker.wait_for("waiting for jobs")
        ran = dispatch(hero_redis, "let x = 6; print(CALLER_ID); x * 7")
        endless = dispatch(hero_redis, 'let s = ""; loop { s = s + "x"; }', timeout=60)
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{ran}", "status") == "finished", timeout=30)
        assert hero_redis.hget(f"hero:job:{ran}", "output") == f"{'02' + 'ab' * 32}\n42"
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{endless}", "status") == "error", timeout=30)
        failed = hero_redis.hgetall(f"hero:job:{endless}")
        assert failed["error"] and failed.get("reason", "") in ("", "timeout")  # the engine's own limit, or ours
    finally:
        assert worker.stop() == -signal.SIGTERM, worker.output


def test_a_stop_request_stops_a_running_job(redis_server, tmp_path, hero_redis):
    worker = our_worker(redis_server, tmp_path, "--script-timeout", "120")
    try:
        job_id = dispatch(hero_redis, "echo started; sleep 100", timeout=100)
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{job_id}", "status") == "started", timeout=30)
        hero_redis.lpush(f"hero:stop_queue:{CIRCLE}", job_id)
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{job_id}", "status") == "error", timeout=30)
        job = hero_redis.hgetall(f"hero:job:{job_id}")
        assert (job["reason"], job["error"]) == ("stopped", "stopped by a stop request")
        assert hero_redis.lrange(f"hero:reply:{job_id}", 0, -1) == [job_id]
        worker.wait_for(f"stop request for job {job_id}: stopped here")
        # The worker is free again: the next job runs at once (concurrency 4 would hide a held slot: use 1 more
        # job per slot than it has).
        after = [dispatch(hero_redis, "echo again") for _ in range(5)]
        assert eventually_true(lambda: all(hero_redis.hget(f"hero:job:{j}", "status") == "finished" for j in after),
                               timeout=30)
    finally:
        assert worker.stop() == -signal.SIGTERM, worker.output


@pytest_twisted.ensureDeferred
async def test_a_job_stopped_elsewhere_is_killed_here(redis_server, start, hero_redis):
    # A circle's workers share its stop queue: the worker that reads a request marks the job
    # failed, and the one running it sees that within a second.
    worker = start(JobWorker(parse_redis_url(redis_server.url), [CIRCLE],
                             ExecEngine("sh {script_file}", reactor=reactor), schema=HERO, reactor=reactor,
                             script_timeout=120))
    job_id = dispatch(hero_redis, "sleep 100", timeout=100)
    await eventually(lambda: hero_redis.hget(f"hero:job:{job_id}", "status") == "started")
    hero_redis.hset(f"hero:job:{job_id}", mapping={"status": "error", "error": "stopped by another worker",
                                                   "reason": "stopped"})
    await eventually(lambda: worker.stopped_tasks == 1 and worker.running_jobs == 0)
    assert hero_redis.hget(f"hero:job:{job_id}", "error") == "stopped by another worker"  # not overwritten


@pytest_twisted.ensureDeferred
async def test_through_sentinels_the_subscription_follows_a_failover(replicated_redis, start, tmp_path):
    # The subscribed connection is one of the Sentinel-aware connections: it reaches the primary,
    # and the new one after a failover, where the runner turns notifications on again.
    runner = start(JobScriptRunner(parse_redis_url(replicated_redis.url), schema=HERO, reactor=reactor))
    await eventually(runner.is_connected)
    assert runner.notifications
    old = replicated_redis.primary()
    worker = ReferenceWorker(old, CIRCLE)
    try:
        await eventually(lambda: worker.said("ready"))
        assert await runner.run(ScriptRequest(circle=CIRCLE, script="6 * 7", caller="", source="ws", timeout=10)) \
            == "42"
        worker.stop()
        old.kill()
        new = await threads.deferToThread(replicated_redis.wait_for_new_primary, old)
        await eventually(lambda: runner.is_connected() and runner._replies.primary[1] == new.port, timeout=60)
        worker = ReferenceWorker(new, CIRCLE)
        await eventually(lambda: worker.said("ready"))
        notified = runner.notified
        assert await runner.run(ScriptRequest(circle=CIRCLE, script="6 * 8", caller="", source="ws", timeout=10)) \
            == "48"
        assert runner.notified > notified  # learnt from the new primary's notifications
        assert runner.notifications
    finally:
        worker.stop()


@pytest_twisted.ensureDeferred
async def test_what_a_worker_writes_is_answered_never_a_traceback(redis_server, start, hero_redis):
    runner = start(JobScriptRunner(parse_redis_url(redis_server.url), schema=HERO, reactor=reactor))
    await eventually(runner.is_connected)
    raw = redis.Redis(port=redis_server.port)  # bytes as they are

    async def played(write: dict, timeout: float = 10) -> object:
        answer = runner.run(ScriptRequest(circle=CIRCLE, script="x", caller="", source="ws", timeout=timeout))
        taken = await threads.deferToThread(raw.brpop, [f"hero:work_queue:{CIRCLE}"], 10)
        raw.hset(f"hero:job:{taken[1].decode()}", mapping=write)
        try:
            return await answer
        except Exception as e:
            return e

    assert await played({"status": "finished", "output": b"\xff\xfeok"}) == "\ufffd\ufffdok"
    assert await played({"status": "finished"}) == ""  # no output written: none
    failed = await played({"status": "error", "error": b"bad \xc3"})
    assert type(failed).__name__ == "ScriptFailed" and failed.detail == "bad \ufffd"
    # A status of no meaning is not an end: the play waits for its timeout.
    assert type(await played({"status": "weird"}, timeout=1)).__name__ == "ScriptTimeout"
    raw.close()


@pytest_twisted.ensureDeferred
async def test_a_full_redis_is_32004_and_nothing_is_written(redis_server, start, hero_redis):
    service, port = await serve(start, redis_server)
    hero_redis.config_set("maxmemory-policy", "noeviction")
    hero_redis.config_set("maxmemory", 1)
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "40 + 2")
    assert reply["error"]["code"] == -32004 and "full" in reply["error"]["message"]
    assert hero_keys(hero_redis) == []
    hero_redis.config_set("maxmemory", 0)
    client.close()


# -- init scripts (-k PK:FILE) under the hero protocol -----------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_servers_init_script_is_a_job_the_first_worker_takes(redis_server, start, reference_worker,
                                                                      hero_redis):
    # Hero's workers do not register: the server queues the init script at once, and the job
    # waits on the work queue until the first worker comes up and takes it.
    init = InitScript(CIRCLE, "echo(initialised)", "init.rhai")
    service, port = await serve(start, redis_server, init_scripts=[init], script_timeout=30.0)
    await eventually(lambda: hero_redis.llen(f"hero:work_queue:{CIRCLE}") == 1)
    worker = reference_worker()
    [line] = await eventually(lambda: worker.said("job"))
    job = worker.job(line.split()[1])
    assert (job["script"], job["caller_id"], job["context_id"]) == ("echo(initialised)", CIRCLE, CIRCLE)
    assert json.loads(job["env_vars"]) == {"CIRCLES_SOURCE": "init"}
    key = once_key(service.config.redis_prefix, init)
    await eventually(lambda: (hero_redis.get(key) or "").startswith("completed:"))
    # Once: the next rounds queue nothing more.
    await sleep(2 * tasks.HEARTBEAT_INTERVAL + 0.5)
    assert len(worker.said("job")) == 1


def test_our_worker_runs_its_init_script_before_the_circles_jobs(redis_server, tmp_path, hero_redis):
    trace = tmp_path / "trace"
    init = tmp_path / "init.sh"
    init.write_text(f"echo init >> {trace}\n")
    worker = Twistd(["--worker-protocol", "hero", "--redis-url", redis_server.url, "-k", f"{CIRCLE}:{init}",
                     "--exec", "sh {script_file}"], tmp_path, plugin="circles-worker")
    try:
        worker.wait_for("waiting for jobs")
        job_id = dispatch(hero_redis, f"echo job >> {trace}; echo ran")
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{job_id}", "status") == "finished", timeout=30)
        assert trace.read_text().split() == ["init", "job"], worker.output
        [key] = hero_redis.keys(f"circles:init:{CIRCLE}:*")
        assert hero_redis.get(key).startswith("completed:")
    finally:
        assert worker.stop() == -signal.SIGTERM, worker.output
    # A second start with the same script does not run it again.
    again = Twistd(["--worker-protocol", "hero", "--redis-url", redis_server.url, "-k", f"{CIRCLE}:{init}",
                    "--exec", "sh {script_file}"], tmp_path, plugin="circles-worker")
    try:
        again.wait_for("waiting for jobs")
        job_id = dispatch(hero_redis, f"echo job >> {trace}")
        assert eventually_true(lambda: hero_redis.hget(f"hero:job:{job_id}", "status") == "finished", timeout=30)
        assert trace.read_text().split() == ["init", "job", "job"]
    finally:
        assert again.stop() == -signal.SIGTERM, again.output


# -- the jobs methods of the hero contract, run in the hero protocol -----------------------------

@pytest_twisted.ensureDeferred
async def test_the_jobs_methods_run_through_the_hero_protocol(redis_server, start, reference_worker, hero_redis):
    # A hero client's jobs reach a worker of the hero dispatcher protocol: both halves of the ecosystem.
    _, port = await serve(start, redis_server, api="hero")
    worker = reference_worker()
    client = await RPCClient.open(port, CIRCLE, [SUBPROTOCOLS["hero"]])
    caller = await client.authenticate(new_key())
    ran = await client.call("run_job", {"script": "6 * 7", "script_type": "rhai"})
    assert ran["result"] == "42", ran
    created = await client.call("create_job", {"job": {"script": "caller()", "script_type": "rhai", "timeout": 10}})
    job_id = created["result"]
    assert (await client.call("start_job", [job_id]))["result"] == {"success": True}

    async def finished() -> bool:
        return (await client.call("get_job_status", [job_id]))["result"]["status"] == "finished"

    for _ in range(100):
        if await finished():
            break
        await sleep(0.1)
    assert (await client.call("get_job_output", [job_id]))["result"] == caller
    taken = [worker.job(line.split()[1]) for line in worker.said("job")]
    assert [(job["script"], job["caller_id"]) for job in taken] == [("6 * 7", caller), ("caller()", caller)]
    assert {json.loads(job["env_vars"])["CIRCLES_SOURCE"] for job in taken} == {"job"}
    client.close()
