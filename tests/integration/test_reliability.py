"""An acknowledged task is never lost; workers can be seen (docs/worker-protocol.md).

Workers take tasks into a processing list of their own and heartbeat; when one stops
heartbeating (killed, or paused past its TTL), a reaper (any worker, any server) re-runs its
webhook tasks, up to ``max_attempts``, then dead-letters them, and answers its plays at once with
an error (a play is never run twice). Real redis-servers throughout, and real ``twistd``
processes killed with SIGKILL for the end-to-end cases. (What needs no Redis:
tests/unit/test_reliability.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from circles import CirclesService, Config
from circles.backend import tasks
from circles.backend.dispatch import RedisScriptRunner
from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import NoWorker, ScriptFailed, ScriptRequest
from circles.server.providers.secrets import STRIPE_ENV, WebhookSecrets
from circles.worker.engines import EngineError
from circles.worker.service import FAILURES_SHOWN, Worker
from devtools.webhook_support import STRIPE_SECRET, encode, post_sync, stripe_event, stripe_headers

from ..play_client import RPCClient, eventually, new_key, pk
from ..support import request, twistd
from ..unit.test_reliability import CIRCLE

FAST = {"heartbeat": 0.2, "worker_ttl": 1.0}  # in-process workers: lost one second after their last heartbeat


def webhook(script: str = "on_event()") -> ScriptRequest:
    return ScriptRequest(circle=CIRCLE, script=script, caller="", source="webhook:stripe", timeout=3600)


def play_request(script: str, timeout: float = 60) -> ScriptRequest:
    return ScriptRequest(circle=CIRCLE, script=script, caller="", source="ws", timeout=timeout)


def make_runner(redis_server, **kw) -> RedisScriptRunner:
    return RedisScriptRunner(parse_redis_url(redis_server.url), reactor=reactor, **kw)


def make_worker(redis_server, engine, **kw) -> Worker:
    return Worker(parse_redis_url(redis_server.url), [CIRCLE], engine, reactor=reactor, **{**FAST, **kw})


async def serving(worker: Worker) -> Worker:
    await eventually(lambda: worker.registered)
    return worker


def pause(worker: Worker) -> None:
    """The worker stops heartbeating but goes on running what it runs: as a process stopped
    (SIGSTOP, a VM paused) or cut off from Redis past its TTL."""
    worker._beats.stop()


def statuses(redis_client) -> list[str]:
    return [redis_client.hgetall(key).get("status") for key in redis_client("KEYS", "circles:task:*")]


class Recorder:
    """An engine: each call recorded, each answered by a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, script, context):
        d = Deferred()
        self.calls.append((script, context, d))
        return d


# -- in-process: paused workers, the dead-letter list, the CLI ------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_play_to_a_circle_without_a_live_worker_is_refused_at_once_and_nothing_is_written(
        redis_server, start, redis_client):
    runner = start(make_runner(redis_server))
    await eventually(runner.is_connected)
    with pytest.raises(NoWorker):
        await runner.run(play_request("print(1)"))
    assert redis_client("KEYS", "*") == [] and runner.in_flight == 0
    # A webhook is still accepted: its task waits in the queue for a worker.
    queued = await runner.enqueue_once(webhook(), "{}", "stripe:evt_1", 60)
    assert redis_client("LRANGE", f"circles:queue:{CIRCLE}", 0, -1) == [queued.task_id]
    # A worker whose heartbeat lapsed is not live either.
    redis_client("ZADD", f"circles:workers:{CIRCLE}", 1, "long-gone")
    with pytest.raises(NoWorker):
        await runner.run(play_request("print(1)"))
    ran = []
    worker = await serving(start(make_worker(redis_server, lambda s, c: ran.append(c.task_id) or "ok")))
    assert await runner.run(play_request("print(1)")) == "ok"
    assert queued.task_id in ran
    await worker.stopService()  # deregistered: refused at once again
    assert redis_client("ZCARD", "circles:workers") == 0 and redis_client("ZCARD", f"circles:workers:{CIRCLE}") == 0
    assert redis_client("KEYS", "circles:processing:*") == []
    with pytest.raises(NoWorker):
        await runner.run(play_request("print(1)"))


@pytest_twisted.ensureDeferred
async def test_a_paused_worker_s_webhook_task_runs_again_elsewhere_and_its_late_result_is_refused(
        redis_server, start, redis_client):
    runner = start(make_runner(redis_server))
    await eventually(runner.is_connected)
    first = Recorder()
    paused = await serving(start(make_worker(redis_server, first, worker_id="paused")))
    queued = await runner.enqueue_once(webhook(), '{"id": "evt_paused"}', "stripe:evt_paused", 60)
    key = f"circles:task:{queued.task_id}"
    await eventually(lambda: first.calls)
    assert redis_client.hgetall(key)["status"] == "processing"
    assert redis_client("LRANGE", "circles:processing:paused", 0, -1) == [queued.task_id]
    pause(paused)
    second = []
    other = await serving(start(make_worker(redis_server, lambda s, c: second.append(c) or "again",
                                            worker_id="other")))
    await eventually(lambda: second, timeout=30)  # reaped once its heartbeat lapsed, run here
    [context] = second
    assert context.task_id == queued.task_id and context.attempt == 2 and first.calls[0][1].attempt == 1
    await eventually(lambda: redis_client.hgetall(key).get("status") == "completed")
    # The paused worker wakes up and finishes: the task is no longer its own, nothing is written.
    first.calls[0][2].callback("late")
    await eventually(lambda: not paused._running)
    task = redis_client.hgetall(key)
    assert (task["status"], task["worker"], task["attempts"]) == ("completed", "other", "2")
    assert redis_client("KEYS", "circles:processing:*") == []
    assert other.reaped + runner.housekeeping.reaped == 1


@pytest_twisted.ensureDeferred
async def test_a_webhook_task_past_its_attempts_is_dead_lettered_and_requeued_from_the_command(
        redis_server, start, redis_client, tmp_path):
    runner = start(make_runner(redis_server, webhook_attempts=1))
    await eventually(runner.is_connected)
    first = Recorder()
    paused = await serving(start(make_worker(redis_server, first, worker_id="lost")))
    queued = await runner.enqueue_once(webhook(), '{"id": "evt_dead"}', "stripe:evt_dead", 60)
    key = f"circles:task:{queued.task_id}"
    await eventually(lambda: first.calls)
    pause(paused)
    await eventually(lambda: redis_client("LRANGE", "circles:dead", 0, -1) == [queued.task_id], timeout=30)
    task = redis_client.hgetall(key)
    assert (task["status"], task["attempts"], task["max_attempts"], task["reason"]) == ("dead", "1", "1", "worker_lost")
    assert task["script"] == "on_event()" and task["data"] == '{"id": "evt_dead"}'  # kept to be run again
    assert redis_client("TTL", key) == -1  # kept until an operator acts
    assert "lost" in task["error"]

    def circles(*args):
        return threads.deferToThread(subprocess.run, [sys.executable, "-m", "circles", "tasks", *args,
                                                      "--redis-url", redis_server.url],
                                     capture_output=True, text=True, timeout=60, cwd=tmp_path)

    listed = await circles("dead-letter", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert (letter["task_id"], letter["circle"], letter["source"], letter["attempts"]) == \
        (queued.task_id, CIRCLE, "webhook:stripe", 1)
    text = await circles("dead-letter")
    assert text.stdout.startswith(f"{queued.task_id}  {CIRCLE}  webhook:stripe  attempts 1  ")
    stats = await circles("stats", "--json")
    assert json.loads(stats.stdout) == {"circles": [{"circle": CIRCLE, "workers": 0, "queue": 0, "dead": 1}],
                                        "dead_letters": 1}

    second = []
    await serving(start(make_worker(redis_server, lambda s, c: second.append(c) or "ran", worker_id="fresh")))
    stats = await circles("stats")
    assert stats.stdout.split("\n")[1].split() == [CIRCLE, "1", "0", "1"]
    missing = await circles("requeue", "no-such-task")
    assert missing.returncode == 1 and "not in the dead-letter list: no-such-task" in missing.stderr
    requeued = await circles("requeue", queued.task_id)
    assert requeued.returncode == 0 and requeued.stdout == f"requeued {queued.task_id}\n"
    await eventually(lambda: second)
    assert second[0].task_id == queued.task_id and second[0].attempt == 2
    await eventually(lambda: redis_client.hgetall(key).get("status") == "completed")
    assert redis_client("LLEN", "circles:dead") == 0
    assert (await circles("requeue", "--all")).stdout == ""  # nothing left to requeue
    first.calls[0][2].callback("late")


@pytest_twisted.ensureDeferred
async def test_a_play_whose_worker_is_lost_is_answered_at_once_and_never_run_again(redis_server, start, redis_client):
    runner = start(make_runner(redis_server))
    await eventually(runner.is_connected)
    first = Recorder()
    paused = await serving(start(make_worker(redis_server, first, worker_id="gone")))
    answer = runner.run(play_request("print(1)", timeout=600))
    await eventually(lambda: first.calls)
    pause(paused)
    ran = []
    await serving(start(make_worker(redis_server, lambda s, c: ran.append(s) or s, worker_id="next")))
    with pytest.raises(ScriptFailed) as failed:
        await answer  # the deadline is ten minutes off: answered by the reaper
    assert "worker running the script was lost (gone)" in failed.value.detail
    assert await runner.run(play_request("after")) == "after"
    assert ran == ["after"]  # the lost play was not run again
    task_id = first.calls[0][1].task_id
    task = redis_client.hgetall(f"circles:task:{task_id}")
    assert (task["status"], task["reason"]) == ("error", "worker_lost") and "script" not in task
    first.calls[0][2].callback("late")


@pytest_twisted.ensureDeferred
async def test_a_new_worker_is_live_at_once_not_after_its_first_interval(redis_server, start, redis_client):
    """The first heartbeat goes out as soon as Redis answers: with an interval of an hour, the
    worker still counts as live (plays to its circle were -32008 for an interval after every
    start while the first heartbeat found txredisapi's pool not yet filled)."""
    worker = start(make_worker(redis_server, lambda script, context: "ok", heartbeat=3600.0, worker_ttl=7200.0))
    await eventually(lambda: worker.registered)
    assert redis_client("ZCARD", f"circles:workers:{CIRCLE}") == 1


@pytest_twisted.ensureDeferred
async def test_two_reapers_racing_requeue_once(redis_server, start, redis_client):
    """The REAP step is its own lock: however many reapers run, a dead worker is reaped once."""
    runner = start(make_runner(redis_server))
    await eventually(runner.is_connected)
    redis_client("ZADD", "circles:workers", 1, "dead-worker")
    ids = []
    for i in range(3):
        queued = await runner.enqueue_once(webhook(), "{}", f"stripe:race{i}", 60)
        ids.append(queued.task_id)
    # As a worker leaves them: one taken but not claimed, two claimed and running.
    for task_id in ids:
        redis_client("LREM", f"circles:queue:{CIRCLE}", 0, task_id)
        redis_client("LPUSH", "circles:processing:dead-worker", task_id)
    for task_id in ids[1:]:
        redis_client("HSET", f"circles:task:{task_id}", "status", "processing", "worker", "dead-worker",
                     "attempts", 1)
    results = [redis_client("EVAL", tasks.REAP, 3, "circles:workers", "circles:processing:dead-worker",
                            "circles:dead", "circles:", "dead-worker", "0", 30, 300) for _ in range(3)]
    assert results == [[3, 0, 0, 0], None, None]
    assert sorted(redis_client("LRANGE", f"circles:queue:{CIRCLE}", 0, -1)) == sorted(ids)
    assert redis_client("LLEN", f"circles:queue:{CIRCLE}") == 3
    assert set(statuses(redis_client)) == {"pending"}


# -- workers you can see ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_metrics_show_live_workers_and_queues_and_plays_without_one_are_32008(redis_server, start):
    from .test_ops import _get, _sample

    other = pk(new_key())
    service = start(CirclesService(Config(listen=("tcp:0:interface=127.0.0.1",), redis_url=redis_server.url,
                                          circles=[CIRCLE, other], stripe_secrets=WebhookSecrets.of(STRIPE_SECRET),
                                          drain_grace=0), reactor=reactor))
    [port] = await service.when_listening()
    port = port.getHost().port
    await eventually(service.script_runner.is_connected)
    client = await RPCClient.open(port, CIRCLE)
    refused = await client.call("play", {"script": "print(1)", "timeout": 600})
    assert refused["error"] == {"code": -32008, "message": "No worker is serving this circle"}
    from devtools.webhook_support import post
    body = encode(stripe_event("evt_waits"))
    accepted = await post(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))
    assert accepted.code == 200  # queued: it waits for a worker
    assert (await _get(f"http://127.0.0.1:{port}/ready"))[0] == 200
    base = f"http://127.0.0.1:{port}/metrics"

    async def sample(name, circle):
        return _sample((await _get(base))[2], name, circle=circle)

    await eventually(lambda: service.script_runner.housekeeping.circle_stats.get(CIRCLE) == (0, 1))
    assert await sample("circles_queue_length", CIRCLE) == 1 and await sample("circles_workers", CIRCLE) == 0
    assert f'circles_workers{{circle="{other}"}} 0.0' in (await _get(base))[2]
    worker = await serving(start(make_worker(redis_server, lambda s, c: "ok")))
    await eventually(lambda: service.script_runner.housekeeping.circle_stats.get(CIRCLE) == (1, 0))
    assert await sample("circles_workers", CIRCLE) == 1 and await sample("circles_queue_length", CIRCLE) == 0
    assert (await client.call("play", {"script": "print(1)"}))["result"] == {"output": "ok"}
    assert _sample((await _get(base))[2], "circles_dead_letters") == 0
    await worker.stopService()
    await eventually(lambda: service.script_runner.housekeeping.circle_stats.get(CIRCLE) == (0, 0))
    client.close()


# -- the worker's log ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_failed_scripts_are_logged_within_a_budget_and_escaped(redis_server, start, redis_client):
    """One client failing scripts as fast as it can wrote 4,414 worker lines in 20 s, with the
    scripts' control characters raw. Now the first FAILURES_SHOWN a minute, the rest summed up."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        runner = start(make_runner(redis_server))
        await eventually(runner.is_connected)

        def engine(script, context):
            raise EngineError(f"bad \x1b[31mred\x1b[0m {script}\u202e\x00 \\ end\nsecond line")

        worker = await serving(start(make_worker(redis_server, engine, concurrency=4)))
        for i in range(FAILURES_SHOWN + 15):
            await runner.enqueue_once(webhook(f"s{i}"), "{}", f"stripe:log{i}", 60)
        await eventually(lambda: redis_client("KEYS", "circles:task:*") and
                         set(statuses(redis_client)) == {"error"}, timeout=60)
        await worker.stopService()  # writes the summary of what went unlogged
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent
    failed = [e for e in events if "failed after" in (e.get("log_format") or "")]
    assert len(failed) == FAILURES_SHOWN
    for event in failed:
        line = formatEvent(event)
        assert not any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in line), repr(line)
        assert "bad \\x1b[31mred\\x1b[0m s" in line and "\\u202e\\x00 \\\\ end (+1 more line)" in line
    [summary] = [formatEvent(e) for e in events if e.get("log_format", "").startswith("{subject}")]
    assert summary.startswith("failed scripts: 15 more in 60.0s not logged one by one: by kind {'error': 15}")


# -- real processes, killed ---------------------------------------------------------------------------

WORKER_OPTIONS = ["--exec", "sh {script_file}", "--heartbeat", "0.5", "--worker-ttl", "2"]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_webhook_task_whose_worker_is_killed_runs_again_exactly_once(tmp_path, redis_server, redis_client,
                                                                       monkeypatch):
    """THE case: Stripe was answered 200, the worker running the event's script is SIGKILLed:
    a new worker runs it again (CIRCLES_ATTEMPT=2), once, and nothing stays ``processing``."""
    monkeypatch.setenv(STRIPE_ENV, STRIPE_SECRET)
    runs, done = tmp_path / "runs", tmp_path / "done"
    script = tmp_path / "stripe.sh"
    script.write_text(f'echo "$CIRCLES_ATTEMPT" >> {runs}\nsleep 5\necho "$CIRCLES_ATTEMPT" >> {done}\nprintf ok\n')
    server_args = ["--listen", "tcp:0:interface=127.0.0.1", "-k", CIRCLE, "--redis-url", redis_server.url,
                   "--stripe-script", str(script)]
    worker_args = ["-k", CIRCLE, "--redis-url", redis_server.url, *WORKER_OPTIONS]
    with twistd(server_args, tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        with twistd(worker_args, tmp_path, plugin="circles-worker") as doomed:
            doomed.wait_for("waiting for tasks")
            body = encode(stripe_event("evt_killed"))
            status, answer = post_sync(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))
            assert status == 200, answer
            key = f"circles:task:{answer['task_id']}"
            _wait(lambda: _lines(runs) == ["1"], "the first run never started")
            doomed.proc.kill()  # SIGKILL: no goodbye, the task is left processing
            doomed.proc.wait()
        with twistd(worker_args, tmp_path, plugin="circles-worker") as worker:
            worker.wait_for("waiting for tasks")
            _wait(lambda: redis_client.hgetall(key).get("status") == "completed", "never completed")
        assert _lines(runs) == ["1", "2"] and _lines(done) == ["2"]
        assert set(statuses(redis_client)) == {"completed"}
        assert redis_client("KEYS", "circles:processing:*") == []
        assert redis_client("LLEN", "circles:dead") == 0
    assert "Traceback" not in server.output + worker.output
    assert "stopped heartbeating: reaped; of its tasks 1 re-queued" in server.output + worker.output


def test_a_play_whose_worker_is_killed_is_answered_with_an_error_and_not_run_again(tmp_path, redis_server,
                                                                                  redis_client):
    from websockets.sync.client import connect

    runs = tmp_path / "runs"
    server_args = ["--listen", "tcp:0:interface=127.0.0.1", "-k", CIRCLE, "--redis-url", redis_server.url]
    worker_args = ["-k", CIRCLE, "--redis-url", redis_server.url, *WORKER_OPTIONS]
    with twistd(server_args, tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        with connect(f"ws://127.0.0.1:{port}/{CIRCLE}") as ws:
            with twistd(worker_args, tmp_path, plugin="circles-worker") as doomed:
                doomed.wait_for("waiting for tasks")
                ws.send(json.dumps({"jsonrpc": "2.0", "method": "play", "id": 1,
                                    "params": {"script": f"echo once >> {runs}; sleep 60"}}))
                _wait(lambda: _lines(runs) == ["once"], "the play never started")
                doomed.proc.kill()
                doomed.proc.wait()
            reply = json.loads(ws.recv(timeout=60))  # the script timeout (30 s) is not what answers it
            assert reply["error"]["code"] == -32005, reply
            assert "worker running the script was lost" in reply["error"]["data"]
            with twistd(worker_args, tmp_path, plugin="circles-worker") as worker:
                worker.wait_for("waiting for tasks")
                assert request(ws, "play", {"script": "echo second"}, 2)["result"] == {"output": "second"}
        assert _lines(runs) == ["once"]
        assert redis_client("KEYS", "circles:processing:*") == []
    assert "Traceback" not in server.output + worker.output
