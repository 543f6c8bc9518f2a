"""The Redis script runner and the reference worker against a real redis-server."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults

from circles.backend import tasks
from circles.backend.dispatch import RedisScriptRunner
from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import BackendUnavailable, NotAMember, NoWorker, ScriptFailed, ScriptRequest, ScriptTimeout
from circles.common.timers import IDLE_LANES
from circles.worker.service import Worker

from ..play_client import eventually, new_key, pk, sleep

CIRCLE = pk(new_key())
CALLER = pk(new_key())


def request(script: str, timeout: float = 20.0, circle: str = CIRCLE, caller: str = CALLER) -> ScriptRequest:
    return ScriptRequest(circle=circle, script=script, caller=caller, source="ws", timeout=timeout)


def echo_engine(script, context):
    if script.startswith("fail:"):
        raise ValueError(script[5:])
    return json.dumps({"script": script, "circle": context.circle, "caller": context.caller,
                       "source": context.source, "task_id": context.task_id, "data": context.data})


def make_runner(redis_server, **kw) -> RedisScriptRunner:
    return RedisScriptRunner(parse_redis_url(redis_server.url), reactor=reactor, **kw)


def make_worker(redis_server, engine=echo_engine, circles=(CIRCLE,), **kw) -> Worker:
    return Worker(parse_redis_url(redis_server.url), list(circles), engine, reactor=reactor, **kw)


async def serving(worker):
    """``worker`` once it has heartbeated: a play to its circle is queued from then on."""
    await eventually(lambda: worker.registered)
    return worker


async def given_up(*plays) -> None:
    """Cancel ``plays`` (their client left) and see each fail so."""
    for play in plays:
        play.cancel()
        with pytest.raises(CancelledError):
            await play


async def connected(runner):
    await eventually(runner.is_connected)
    return runner


@pytest_twisted.ensureDeferred
async def test_play_through_worker(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    worker = await serving(start(make_worker(redis_server)))
    output = json.loads(await runner.run(request("print(1)")))
    assert output["script"] == "print(1)"
    assert (output["circle"], output["caller"], output["source"]) == (CIRCLE, CALLER, "ws")
    task = redis_client.hgetall(f"circles:task:{output['task_id']}")
    assert task["status"] == "completed" and task["reply_to"] == runner.reply_key
    assert float(task["created_at"]) <= float(task["updated_at"]) <= float(task["deadline"])
    # The reply delivered the result: the hash keeps its status fields only, for seconds.
    assert not {"script", "output", "error", "data"} & set(task), task
    assert (task["attempts"], task["worker"]) == ("1", worker.worker_id)
    assert 0 < redis_client("TTL", f"circles:task:{output['task_id']}") <= tasks.STATUS_TTL
    assert redis_client("LLEN", f"circles:processing:{worker.worker_id}") == 0


@pytest_twisted.ensureDeferred
async def test_script_error_carries_message(redis_server, start):
    runner = await connected(start(make_runner(redis_server)))
    await serving(start(make_worker(redis_server)))
    with pytest.raises(ScriptFailed) as e:
        await runner.run(request("fail:undefined variable x"))
    assert "undefined variable x" in e.value.detail


@pytest_twisted.ensureDeferred
async def test_timeout_expires_task_and_late_worker_skips_it(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    with pytest.raises(ScriptTimeout):
        await runner.run(request("never run", timeout=0.5))
    [task_key] = redis_client("KEYS", "circles:task:*")
    assert redis_client.hgetall(task_key)["status"] == "expired"
    assert "script" not in redis_client.hgetall(task_key)  # status fields only, for seconds
    assert 0 < redis_client("TTL", task_key) <= tasks.STATUS_TTL
    ran = []
    await serving(start(make_worker(redis_server, engine=lambda script, ctx: ran.append(script) or "ran")))
    await eventually(lambda: redis_client("LLEN", f"circles:queue:{CIRCLE}") == 0)
    await sleep(0.3)
    assert ran == [] and redis_client.hgetall(task_key)["status"] == "expired"
    # and the worker serves the next, live task
    assert await runner.run(request("live")) == "ran"


@pytest_twisted.ensureDeferred
async def test_worker_finishing_after_expiry_does_not_overwrite(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    release = Deferred()
    await serving(start(make_worker(redis_server, engine=lambda script, ctx: release, script_timeout=60)))
    with pytest.raises(ScriptTimeout):
        await runner.run(request("slow", timeout=0.5))
    release.callback("too late")
    [task_key] = redis_client("KEYS", "circles:task:*")
    await sleep(0.3)
    assert redis_client.hgetall(task_key)["status"] == "expired"
    assert redis_client("LLEN", runner.reply_key) == 0


@pytest_twisted.ensureDeferred
async def test_plays_waiting_hold_a_call_of_the_clock_per_timeout_not_one_each(redis_server, start, redis_client):
    # A DelayedCall per play sat in the reactor's heap (compared in Python at every call of the
    # clock); the plays of one timeout share one now, and a timeout's lane goes once it holds no
    # play and its call has come (those past IDLE_LANES at once).
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    before = len(reactor.getDelayedCalls())
    plays = [runner.run(request(f"waits {i}", timeout=20)) for i in range(100)]
    plays += [runner.run(request(f"its own {i}", timeout=20 + (i + 1) / 8)) for i in range(3)]
    await eventually(lambda: len(redis_client("KEYS", "circles:task:*")) == 103)
    # a call per timeout (4), and one for the reply timeouts of the commands (a lane too)
    assert len(reactor.getDelayedCalls()) - before <= 5, reactor.getDelayedCalls()
    short = runner.run(request("times out", timeout=0.25))
    with pytest.raises(ScriptTimeout):
        await short  # each still at its own deadline
    await given_up(*plays)
    kept = len(runner.replies._deadlines)  # lanes with no play, each with its call, until it comes
    assert len(runner.replies) == 0 and kept <= IDLE_LANES
    # what is left: those calls, and the reply timeouts' lane (the expiries of the tasks given up
    # on are commands)
    await eventually(lambda: len(reactor.getDelayedCalls()) <= before + kept + 1)


@pytest_twisted.ensureDeferred
async def test_concurrent_plays_share_one_blocking_connection(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    gate = Deferred()
    await serving(start(make_worker(redis_server, concurrency=50,
                                    engine=lambda script, ctx: gate.addCallback(lambda _: script) and gate)))
    runs = [runner.run(request(f"script {i}")) for i in range(200)]
    await eventually(lambda: redis_client("KEYS", "circles:task:*") and
                     len(redis_client("KEYS", "circles:task:*")) == 200)
    # runner: 2 connections, worker: 2 connections, plus this inspecting client
    clients = redis_client.clients()
    assert len(clients) == 5, clients
    assert sum(1 for c in clients if c.get("cmd") in ("blmpop", "blmove")) <= 2
    gate.callback(None)
    results = await gatherResults(runs)
    assert results == [f"script {i}" for i in range(200)]


@pytest_twisted.ensureDeferred
async def test_two_runners_each_get_their_own_replies(redis_server, start):
    one = await connected(start(make_runner(redis_server)))
    two = await connected(start(make_runner(redis_server)))
    assert one.reply_key != two.reply_key
    await serving(start(make_worker(redis_server, concurrency=8)))
    plays = [(d, i, d.run(request(f"{name}-{i}"))) for i in range(50) for name, d in (("one", one), ("two", two))]
    for d, i, result in plays:
        name = "one" if d is one else "two"
        assert json.loads(await result)["script"] == f"{name}-{i}"


@pytest_twisted.ensureDeferred
async def test_redis_killed_mid_run_then_restarted(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    in_flight = runner.run(request("waits for a worker that is not there"))
    redis_server.kill()
    with pytest.raises(BackendUnavailable):
        await in_flight
    with pytest.raises(BackendUnavailable):  # fails at once, while Redis is down
        await runner.run(request("x"))
    redis_server.start()
    await eventually(runner.is_connected)
    await serving(start(make_worker(redis_server)))
    assert json.loads(await runner.run(request("back")))["script"] == "back"


@pytest_twisted.ensureDeferred
async def test_redis_down_at_start(redis_server, start):
    redis_server.kill()
    runner = start(make_runner(redis_server))
    with pytest.raises(BackendUnavailable):
        await runner.run(request("x"))
    with pytest.raises(BackendUnavailable):
        await runner.enqueue_once(request("x"), "{}", "event-x", 60)
    redis_server.start()
    await connected(runner)
    await serving(start(make_worker(redis_server)))
    assert json.loads(await runner.run(request("up")))["script"] == "up"


@pytest_twisted.ensureDeferred
async def test_enqueue_without_waiting(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    event = {"id": "evt_1", "type": "payment_intent.succeeded", "amount": 42}
    body = json.dumps(event)
    queued = await runner.enqueue_once(ScriptRequest(CIRCLE, "on_payment()", "", "webhook:stripe", 60), body,
                                       "stripe:evt_1", 60)
    task_id = queued.task_id
    assert not queued.duplicate
    task = redis_client.hgetall(f"circles:task:{task_id}")
    assert task["status"] == "pending" and task["reply_to"] == "" and json.loads(task["data"]) == event
    assert task["data"] == body  # stored as given, byte for byte
    assert redis_client("LRANGE", f"circles:queue:{CIRCLE}", 0, -1) == [task_id]
    seen = []
    await serving(start(make_worker(redis_server,
                                    engine=lambda script, ctx: seen.append(ctx) or echo_engine(script, ctx))))
    await eventually(lambda: redis_client.hgetall(f"circles:task:{task_id}")["status"] == "completed")
    [context] = seen
    assert context.source == "webhook:stripe" and json.loads(context.data) == event and context.attempt == 1
    # Nobody waits for a webhook's result: the hash keeps its status fields only, for seconds.
    task = redis_client.hgetall(f"circles:task:{task_id}")
    assert not {"script", "output", "error", "data"} & set(task), task
    assert task["max_attempts"] == str(tasks.DEFAULT_ATTEMPTS) and task["attempts"] == "1"
    assert 0 < redis_client("TTL", f"circles:task:{task_id}") <= tasks.STATUS_TTL


@pytest_twisted.ensureDeferred
async def test_stopping_answers_in_flight_and_expires(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    in_flight = runner.run(request("nobody runs this"))
    await eventually(lambda: redis_client("KEYS", "circles:task:*"))
    await runner.stopService()
    with pytest.raises(BackendUnavailable):
        await in_flight
    [task_key] = redis_client("KEYS", "circles:task:*")
    assert redis_client.hgetall(task_key)["status"] == "expired"


@pytest_twisted.ensureDeferred
async def test_malformed_replies_are_ignored(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    for junk in ["", "{not json", '{"task_id": 5}', '{"task_id": "x", "status": "processing"}', "a b"]:
        redis_client("LPUSH", runner.reply_key, junk)
    await serving(start(make_worker(redis_server)))
    assert json.loads(await runner.run(request("after junk")))["script"] == "after junk"


@pytest_twisted.ensureDeferred
async def test_bare_task_id_reply(redis_server, start, redis_client):
    """A worker may reply with the task id alone: the result is read from the task hash."""
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    run = runner.run(request("by hand"))
    task_id = await eventually(lambda: redis_client("RPOP", f"circles:queue:{CIRCLE}"))
    key = f"circles:task:{task_id}"
    redis_client("HSET", key, "status", "completed", "output", "42")
    redis_client("LPUSH", runner.reply_key, task_id)
    assert await run == "42"  # text stays text
    assert redis_client("EXISTS", key) == 0  # read, then deleted: the reply delivered it


@pytest_twisted.ensureDeferred
async def test_worker_stop_finishes_running_script(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server)))
    release = Deferred()
    worker = await serving(start(make_worker(redis_server, engine=lambda s, c: release)))
    run = runner.run(request("x"))
    await eventually(lambda: any(redis_client.hgetall(k).get("status") == "processing"
                                 for k in redis_client("KEYS", "circles:task:*")))
    stopping = worker.stopService()
    reactor.callLater(0.2, release.callback, "finished")
    await stopping
    assert await run == "finished"


@pytest_twisted.ensureDeferred
async def test_prefix(redis_server, start, redis_client):
    runner = await connected(start(make_runner(redis_server, prefix="app1:")))
    await serving(start(make_worker(redis_server, prefix="app1:")))
    assert json.loads(await runner.run(request("p")))["script"] == "p"
    assert all(k.startswith("app1:") for k in redis_client("KEYS", "*"))


@pytest_twisted.ensureDeferred
async def test_worker_timeout_is_a_timeout_not_a_failure(redis_server, start, redis_client):
    """The worker's own --script-timeout and the server's deadline are one condition: -32003
    (ScriptTimeout), told by the reply's ``reason``, also in the task hash."""
    runner = await connected(start(make_runner(redis_server)))
    await serving(start(make_worker(redis_server, engine=lambda s, c: Deferred(), script_timeout=0.5)))
    with pytest.raises(ScriptTimeout):
        await runner.run(request("never ends", timeout=30))
    [key] = redis_client("KEYS", "circles:task:*")
    task = redis_client.hgetall(key)
    assert (task["status"], task["reason"]) == ("error", "timeout") and "error" not in task


@pytest_twisted.ensureDeferred
async def test_timeout_reason_in_the_hash_of_a_bare_reply(redis_server, start, redis_client):
    """A worker replying with the bare task id says "timed out" with the hash's ``reason``."""
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    run = runner.run(request("by hand"))
    task_id = await eventually(lambda: redis_client("RPOP", f"circles:queue:{CIRCLE}"))
    redis_client("HSET", f"circles:task:{task_id}", "status", "error", "error", "stopped", "reason", "timeout")
    redis_client("LPUSH", runner.reply_key, task_id)
    with pytest.raises(ScriptTimeout):
        await run


def test_replies_without_a_reason_still_decode():
    """Workers that predate ``reason`` keep working: their errors stay failures (-32005)."""
    old = '{"task_id":"t","status":"error","output":"","error":"script timed out"}'
    assert tasks.decode_reply(old) == ("t", tasks.Outcome("t", "error", "", "script timed out"))
    assert not tasks.decode_reply(old)[1].timed_out
    new = tasks.encode_reply(tasks.Outcome("t", "error", "", "script timed out", tasks.TIMED_OUT))
    assert tasks.decode_reply(new)[1].timed_out
    assert "reason" not in tasks.encode_reply(tasks.Outcome("t", "completed", "x"))


@pytest_twisted.ensureDeferred
async def test_output_larger_than_the_server_takes_never_reaches_redis(redis_server, start, redis_client):
    """The server writes its cap into the task (``max_output``); the worker refuses a larger
    output, whatever its own --max-output, and reports the size instead."""
    runner = await connected(start(make_runner(redis_server, max_output=1000)))
    await serving(start(make_worker(redis_server, engine=lambda s, c: "é" * 600)))  # 1200 bytes, 600 characters
    with pytest.raises(ScriptFailed) as e:
        await runner.run(request("big"))
    assert e.value.detail == "output too large: 1200 bytes, the limit is 1000"
    [key] = redis_client("KEYS", "circles:task:*")
    task = redis_client.hgetall(key)
    assert (task["max_output"], task.get("output"), task["status"]) == ("1000", None, "error")
    assert len(redis_client("DUMP", key)) < 1000  # nothing of the output was stored


@pytest_twisted.ensureDeferred
async def test_an_output_crosses_to_redis_once(redis_server, start, redis_client):
    """The reply object carries the output; the worker does not send it a second time beside it
    (FINISH would not store it: the hash keeps a played task's status fields only)."""
    runner = await connected(start(make_runner(redis_server)))
    await serving(start(make_worker(redis_server, engine=lambda s, c: "y" * 300_000)))
    assert await runner.run(request("warm")) == "y" * 300_000  # the steps' scripts loaded

    def input_bytes() -> int:
        return int(redis_client("INFO", "stats").split("total_net_input_bytes:", 1)[1].split()[0])

    before = input_bytes()
    assert await runner.run(request("big")) == "y" * 300_000
    sent = input_bytes() - before
    assert 300_000 < sent < 330_000, sent  # twice the output were 600,000 and more
    for key in redis_client("KEYS", "circles:task:*"):
        assert "output" not in redis_client.hgetall(key)


@pytest_twisted.ensureDeferred
async def test_the_worker_cap_applies_when_smaller_and_engines_see_it(redis_server, start):
    runner = await connected(start(make_runner(redis_server, max_output=1000)))
    caps = []

    def engine(script, context):
        caps.append(context.max_output)
        return "x" * int(script)

    await serving(start(make_worker(redis_server, engine=engine, max_output=100)))
    assert await runner.run(request("100")) == "x" * 100
    with pytest.raises(ScriptFailed, match="^output too large: 101 bytes, the limit is 100$"):
        await runner.run(request("101"))
    assert caps == [100, 100]


def command_calls(redis_client, command: str) -> int:
    """How many times Redis ran ``command`` since the last CONFIG RESETSTAT."""
    for line in redis_client("INFO", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


@pytest_twisted.ensureDeferred
async def test_a_backlog_is_taken_as_many_as_slots_free_per_step_not_one_blmove_each(redis_server, start,
                                                                                      redis_client):
    runner = await connected(start(make_runner(redis_server)))
    queued = [await runner.enqueue_once(request(f"backlog {i}"), "{}", f"backlog:{i}", 60) for i in range(40)]
    redis_client("CONFIG", "RESETSTAT")
    gated: list[tuple[Deferred, str]] = []
    started = []

    def engine(script, context):
        started.append(script)
        if len(started) > 8:
            return script
        gated.append((Deferred(), script))
        return gated[-1][0]

    worker = await serving(start(make_worker(redis_server, engine=engine, concurrency=8)))
    processing = tasks.processing_key("circles:", worker.worker_id)
    # Eight taken and claimed at once, and no more while the eight run.
    await eventually(lambda: len(started) == 8)
    assert redis_client("LLEN", processing) == 8
    assert sorted(redis_client("HGET", f"circles:task:{t}", "status") for t in
                  redis_client("LRANGE", processing, 0, -1)) == ["processing"] * 8
    assert redis_client("LLEN", f"circles:queue:{CIRCLE}") == 32
    for d, script in gated:
        d.callback(script)
    await eventually(lambda: all(redis_client("HGET", f"circles:task:{q.task_id}", "status") == "completed"
                                 for q in queued))
    assert sorted(started) == sorted(f"backlog {i}" for i in range(40))
    # One BLMOVE, a CLAIM and a FINISH each would be 40 of each: TAKE takes as many as there are
    # slots free, and the results of one turn are recorded in one FINISH_MANY.
    assert command_calls(redis_client, "blmove") <= 3
    steps = command_calls(redis_client, "evalsha") + command_calls(redis_client, "eval")
    assert steps <= 25, steps
    assert redis_client("LLEN", processing) == 0


def test_take_counts_the_attempt_from_what_it_reads_and_finish_many_sets_each_reply_list_s_ttl_once(redis_client):
    """TAKE reads a task's fields and status in one HMGET and claims it in one HSET: the attempt is
    counted from the value read (none yet: 1). FINISH_MANY pushes every reply, then sets the TTL of
    each reply list that got one once, the longest asked; a list that got none is left alone."""
    prefix, worker = "take-test:", "w1"
    processing, registry = tasks.processing_key(prefix, worker), tasks.workers_key(prefix)
    queue = tasks.queue_key(prefix, CIRCLE)
    now = int(redis_client("TIME")[0])
    redis_client("ZADD", registry, now + 60, worker)
    redis_client("HSET", f"{prefix}task:a", "status", "pending", "script", "one", "circle", CIRCLE, "reply_to", "r1")
    redis_client("HSET", f"{prefix}task:b", "status", "pending", "script", "two", "attempts", "1")  # run once, reaped
    redis_client("HSET", f"{prefix}task:c", "status", "expired", "script", "three")  # expired while it waited
    redis_client("LPUSH", queue, "a", "b", "c")  # taken from the right: a first
    taken = redis_client("EVAL", tasks.TAKE, 3, processing, registry, queue, "stamp", worker, prefix, 5)
    assert taken == ["a", ["one", CIRCLE, None, None, None, None, None, "1", "r1"],
                     "b", ["two", None, None, None, None, None, None, "2", None]]
    assert [redis_client("HGET", f"{prefix}task:{t}", "attempts") for t in "ab"] == ["1", "2"]
    assert [redis_client("HGET", f"{prefix}task:a", f) for f in ("status", "worker", "updated_at")] == [
        "processing", worker, "stamp"]
    assert redis_client("HGET", f"{prefix}task:c", "status") == "expired"
    assert sorted(redis_client("LRANGE", processing, 0, -1)) == ["a", "b"]
    assert redis_client("LLEN", queue) == 0

    def finish(task: str, reply_list: str, ttl: int) -> tuple[list, list]:
        return ([f"{prefix}task:{task}", processing, reply_list],
                ["completed", "", "", "stamp", 30, '{"ok": 1}', "", task, worker, ttl])

    steps = [finish("b", "r1", 300), finish("a", "r1", 100), finish("c", "r2", 300)]  # c: not this worker's
    keys = [k for step in steps for k in step[0]]
    args = [a for step in steps for a in step[1]]
    assert redis_client("EVAL", tasks.FINISH_MANY, len(keys), *keys, *args) == [1, 1, 0]
    assert redis_client("LRANGE", "r1", 0, -1) == ['{"ok": 1}'] * 2
    assert 290 < redis_client("TTL", "r1") <= 300
    assert redis_client("EXISTS", "r2") == 0
    assert redis_client("LLEN", processing) == 0
    assert redis_client("HGET", f"{prefix}task:a", "status") == "completed"
    assert redis_client("HGET", f"{prefix}task:a", "script") is None


@pytest_twisted.ensureDeferred
async def test_tasks_in_its_processing_list_that_nothing_runs_are_adopted_at_start_and_after_a_lost_connection(
        redis_server, start, redis_client):
    """A BLMOVE or TAKE whose reply was lost with the connection leaves tasks in the processing list
    that the worker does not know of: it runs them once it is connected again."""
    runner = await connected(start(make_runner(redis_server)))
    queue = f"circles:queue:{CIRCLE}"
    first, second = [(await runner.enqueue_once(request(f"orphan {i}"), "{}", f"orphan:{i}", 60)).task_id
                     for i in range(2)]
    worker = make_worker(redis_server)
    processing = tasks.processing_key("circles:", worker.worker_id)
    redis_client("LMOVE", queue, processing, "RIGHT", "LEFT")  # as if taken before the worker (re)started
    redis_client("LMOVE", queue, processing, "RIGHT", "LEFT")
    redis_client("HSET", f"circles:task:{second}", "status", "processing", "worker", worker.worker_id,
                 "attempts", 1)  # and this one claimed too, its answer lost
    start(worker)
    await eventually(lambda: [redis_client("HGET", f"circles:task:{t}", "status") for t in (first, second)]
                     == ["completed", "completed"])
    assert redis_client("LLEN", processing) == 0
    # Lost again, with the connection.
    third = "orphan-3"  # written here, not queued: the worker's waiting BLMOVE must not take it first
    redis_client("HSET", f"circles:task:{third}", "script", "orphan 3", "circle", CIRCLE, "caller", CALLER,
                 "source", "webhook:test", "reply_to", "", "status", "pending", "data", "{}")
    redis_client("LPUSH", processing, third)
    redis_client("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await eventually(lambda: redis_client("HGET", f"circles:task:{third}", "status") == "completed")
    assert redis_client("LLEN", processing) == 0


@pytest_twisted.ensureDeferred
async def test_a_play_is_admitted_by_the_circle_s_policy_in_the_step_that_queues_it(redis_server, start,
                                                                                    redis_client):
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    member, stranger = pk(new_key()), pk(new_key())
    redis_client("SET", f"circles:policy:{CIRCLE}", "members")
    redis_client("SADD", f"circles:members:{CIRCLE}", member)
    for caller in (stranger, ""):
        with pytest.raises(NotAMember) as refused:
            await runner.run_admitted(request("refused", caller=caller))
        assert refused.value.policy == "members"
    assert redis_client("KEYS", "circles:task:*") == [] and redis_client("LLEN", f"circles:queue:{CIRCLE}") == 0
    redis_client("SET", f"circles:policy:{CIRCLE}", "member")  # not a policy: refuses everyone
    with pytest.raises(NotAMember, match=r"\(member\)"):
        await runner.run_admitted(request("refused", caller=member))
    redis_client("SET", f"circles:policy:{CIRCLE}", "members")
    admitted = runner.run_admitted(request("admitted", caller=member))
    # run() is not subject to the policy (an init script's caller is the circle itself).
    unchecked = runner.run(request("unchecked", caller=stranger))
    await eventually(lambda: redis_client("LLEN", f"circles:queue:{CIRCLE}") == 2)
    assert sorted(redis_client("HGET", f"circles:task:{t}", "script")
                  for t in redis_client("LRANGE", f"circles:queue:{CIRCLE}", 0, -1)) == ["admitted", "unchecked"]
    await given_up(admitted, unchecked)


@pytest_twisted.ensureDeferred
async def test_the_plays_of_one_turn_are_queued_in_one_step_each_with_its_own_answer(redis_server, start,
                                                                                    redis_client):
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    member, stranger, nobody_serves = pk(new_key()), pk(new_key()), pk(new_key())
    redis_client("SET", f"circles:policy:{CIRCLE}", "members")
    redis_client("SADD", f"circles:members:{CIRCLE}", member)
    redis_client("CONFIG", "RESETSTAT")
    # In one turn of the reactor: admitted plays, a refused one, one to a circle without a worker,
    # one not checked (an init script's), and one whose caller leaves before the turn ends.
    admitted = [runner.run_admitted(request(f"admitted {i}", caller=member)) for i in range(30)]
    refused = runner.run_admitted(request("refused", caller=stranger))
    no_worker = runner.run_admitted(request("no worker", circle=nobody_serves, caller=member))
    unchecked = runner.run(request("unchecked", caller=stranger))
    left = runner.run_admitted(request("left", caller=member))
    left.cancel()
    with pytest.raises(NotAMember):
        await refused
    with pytest.raises(NoWorker):
        await no_worker
    with pytest.raises(CancelledError):
        await left
    await eventually(lambda: redis_client("LLEN", f"circles:queue:{CIRCLE}") == 31)
    scripts = sorted(redis_client("HGET", f"circles:task:{t}", "script")
                     for t in redis_client("LRANGE", f"circles:queue:{CIRCLE}", 0, -1))
    assert scripts == sorted([f"admitted {i}" for i in range(30)] + ["unchecked"])
    assert len(redis_client("KEYS", "circles:task:*")) == 31  # nothing of the refused, unserved or left
    assert command_calls(redis_client, "evalsha") + command_calls(redis_client, "eval") <= 2  # one step (and a STATS)
    await given_up(*admitted, unchecked)


@pytest_twisted.ensureDeferred
async def test_a_task_that_cannot_be_sent_fails_alone_not_the_plays_queued_with_it(redis_server, start,
                                                                                  redis_client):
    runner = await connected(start(make_runner(redis_server)))
    redis_client.pretend_worker(CIRCLE)
    good = [runner.run(request(f"good {i}")) for i in range(3)]
    bad = runner.run(request("lone \ud800 surrogate"))  # (a client's play is refused before: -32602)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        await bad
    await eventually(lambda: redis_client("LLEN", f"circles:queue:{CIRCLE}") == 3)
    await given_up(*good)
