"""play end to end: WebSocket client -> CirclesService -> Redis -> reference worker -> back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from circles import CirclesService, Config
from circles.backend.redis_url import parse_redis_url
from circles.worker.engines import ExecEngine
from circles.worker.service import Worker

from ..play_client import RPCClient, eventually, new_key, pk, sleep

CIRCLE_KEY = new_key()
CIRCLE = pk(CIRCLE_KEY)


async def serve(start, redis_url=None, **config) -> tuple[CirclesService, int]:
    config.setdefault("circles", [CIRCLE])
    # No load balancer here: a test asking /ready need not wait a drain grace when it stops.
    config.setdefault("drain_grace", 0.0)
    service = start(CirclesService(Config(listen=("tcp:0:interface=127.0.0.1",), redis_url=redis_url, **config),
                                   reactor=reactor))
    [port] = await service.when_listening()
    await eventually(service.script_runner.is_connected)
    return service, port.getHost().port


def sh_worker(address, **kw) -> Worker:
    return Worker(address, [CIRCLE], ExecEngine("sh {script_file}", reactor=reactor), reactor=reactor, **kw)


async def serving(worker: Worker) -> Worker:
    """``worker`` once it has heartbeated: plays to its circle are queued from then on."""
    await eventually(lambda: worker.registered)
    return worker


def play(client, script, **params):
    return client.call("play", {"script": script, **params})


@pytest_twisted.ensureDeferred
async def test_authenticated_play_through_exec_worker(redis_server, start):
    service, port = await serve(start, redis_server.url, auth_required=True)
    await serving(start(sh_worker(parse_redis_url(redis_server.url))))
    client = await RPCClient.open(port, CIRCLE)
    refused = await play(client, "echo hi")
    assert refused["error"]["code"] == -32001
    caller = await client.authenticate(new_key())
    reply = await play(client, 'echo "$CONTEXT_ID"; echo "$CALLER_ID"; echo "$CIRCLES_SOURCE"')
    assert reply["result"] == {"output": f"{CIRCLE}\n{caller}\nws"}
    failed = await play(client, "echo 'Variable not found: x (line 1)' >&2; exit 1")
    assert failed["error"]["code"] == -32005
    assert "Variable not found: x" in failed["error"]["data"]
    client.close()


@pytest_twisted.ensureDeferred
async def test_timeout_with_a_busy_worker(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url, script_timeout=60)
    redis_client.pretend_worker(CIRCLE)  # live, but it takes no task
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "nobody", timeout=0.5)
    assert reply["error"]["code"] == -32003
    [task] = redis_client("KEYS", "circles:task:*")
    assert redis_client.hgetall(task)["status"] == "expired"
    assert redis_client.hgetall(task)["caller"] == ""  # anonymous
    client.close()


@pytest_twisted.ensureDeferred
async def test_play_timeout_cannot_exceed_server_limit(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url, script_timeout=0.5)
    redis_client.pretend_worker(CIRCLE)
    client = await RPCClient.open(port, CIRCLE)
    began = time.monotonic()
    reply = await play(client, "nobody", timeout=3600)
    assert reply["error"]["code"] == -32003 and time.monotonic() - began < 3000
    client.close()


@pytest_twisted.ensureDeferred
async def test_redis_killed_then_restarted(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url)
    await serving(start(sh_worker(parse_redis_url(redis_server.url))))
    client = await RPCClient.open(port, CIRCLE)
    assert (await play(client, "echo one"))["result"] == {"output": "one"}
    in_flight = play(client, "sleep 3")
    await eventually(lambda: any(redis_client.hgetall(k).get("status") == "processing"
                                 for k in redis_client("KEYS", "circles:task:*")))
    redis_server.kill()
    assert (await in_flight)["error"]["code"] == -32004
    assert (await play(client, "echo down"))["error"]["code"] == -32004
    assert (await client.call("whoami"))["result"]["circle"] == CIRCLE  # everything else keeps working
    redis_server.start()
    await eventually(service.script_runner.is_connected)

    async def works():
        reply = await play(client, "echo again")
        return reply.get("result") == {"output": "again"}
    for _ in range(300):  # the worker reconnects on its own too, and heartbeats again (-32008 until then)
        if await works():
            break
        await sleep(0.1)
    else:
        raise AssertionError("play never worked again")
    client.close()


@pytest_twisted.ensureDeferred
async def test_1000_plays_over_50_connections(redis_server, start):
    service, port = await serve(start, redis_server.url)
    await serving(start(Worker(parse_redis_url(redis_server.url), [CIRCLE], lambda script, ctx: f"ran {script}",
                 reactor=reactor, concurrency=50)))
    clients = [await RPCClient.open(port, CIRCLE) for _ in range(50)]
    calls = [(c, i, play(client, f"{c}/{i}")) for c, client in enumerate(clients) for i in range(20)]
    replies = await gatherResults([d for _, _, d in calls])
    for (c, i, _), reply in zip(calls, replies):
        assert reply["result"] == {"output": f"ran {c}/{i}"}, reply
    for client in clients:
        client.close()


@pytest_twisted.ensureDeferred
async def test_two_servers_share_one_redis(redis_server, start):
    _, port_one = await serve(start, redis_server.url)
    _, port_two = await serve(start, redis_server.url)
    await serving(start(Worker(parse_redis_url(redis_server.url), [CIRCLE], lambda script, ctx: script[::-1],
                 reactor=reactor, concurrency=10)))
    one, two = await RPCClient.open(port_one, CIRCLE), await RPCClient.open(port_two, CIRCLE)
    calls = [(f"{name}{i}", play(client, f"{name}{i}")) for i in range(50) for name, client in (("a", one), ("b", two))]
    for script, d in calls:
        assert (await d)["result"] == {"output": script[::-1]}
    one.close()
    two.close()


@pytest_twisted.ensureDeferred
async def test_worker_crash_mid_task_times_out(redis_server, start, redis_client, tmp_path):
    service, port = await serve(start, redis_server.url)
    worker = subprocess.Popen(
        [sys.executable, "-m", "twisted", "circles-worker", "-k", CIRCLE, "--redis-url", redis_server.url,
         "--exec", "sh {script_file}"],
        cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await eventually(lambda: redis_client("ZCARD", f"circles:workers:{CIRCLE}"))  # it heartbeats
        client = await RPCClient.open(port, CIRCLE)
        # The play's deadline (3 s) passes before the worker's TTL (10 s) would have it reaped.
        reply = play(client, "sleep 60", timeout=3)
        [task] = await eventually(lambda: redis_client("KEYS", "circles:task:*"))
        await eventually(lambda: redis_client.hgetall(task).get("status") == "processing")
        worker.kill()
        assert (await reply)["error"]["code"] == -32003
        assert redis_client.hgetall(task)["status"] == "expired"
        client.close()
    finally:
        worker.kill()
        worker.wait()


@pytest_twisted.ensureDeferred
async def test_shutdown_answers_in_flight_play(redis_server, start, redis_client):
    """Past the grace period, a play nobody runs is answered -32004 before the connection closes."""
    service, port = await serve(start, redis_server.url, shutdown_grace=0.5)
    redis_client.pretend_worker(CIRCLE)
    client = await RPCClient.open(port, CIRCLE)
    in_flight = play(client, "nobody")
    await eventually(lambda: service.script_runner.in_flight)
    stopped = service.stopService()
    assert (await in_flight)["error"]["code"] == -32004
    await stopped


@pytest_twisted.ensureDeferred
async def test_shutdown_lets_in_flight_plays_finish_then_says_going_away(redis_server, start):
    """Within the grace period, plays in flight get their results; then each client is told
    1001 (going away), and the listening port is closed from the start of the shutdown."""
    service, port = await serve(start, redis_server.url, shutdown_grace=30)
    await serving(start(sh_worker(parse_redis_url(redis_server.url), concurrency=8)))
    busy = await RPCClient.open(port, CIRCLE)
    idle = await RPCClient.open(port, CIRCLE)
    in_flight = [play(busy, f"sleep 1; echo {i}") for i in range(5)]
    await eventually(lambda: service.script_runner.in_flight == 5)
    stopped = service.stopService()
    await eventually(lambda: idle.closed_code is not None)
    assert idle.closed_code == 1001  # nothing in flight: told at once
    with pytest.raises(ConnectionRefusedError):  # no new connections during the drain
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    replies = [await d for d in in_flight]
    assert [r["result"]["output"] for r in replies] == [f"{i}" for i in range(5)]
    await stopped
    assert busy.closed_code == 1001


@pytest_twisted.ensureDeferred
async def test_shutdown_queues_no_new_play_so_a_busy_connection_drains(redis_server, start, tmp_path):
    """A client that keeps playing (a steady load) while the server drains: its new plays are
    answered -32004 at once and never queued, so the connection closes with 1001 once the play
    in flight at SIGTERM is answered, not at the end of the grace period."""
    service, port = await serve(start, redis_server.url, shutdown_grace=30)
    await serving(start(sh_worker(parse_redis_url(redis_server.url), concurrency=4)))
    busy = await RPCClient.open(port, CIRCLE)
    ran = tmp_path / "ran"
    first = play(busy, f"sleep 1; echo first >> {ran}; echo first")
    await eventually(lambda: service.script_runner.in_flight == 1)
    stopped = service.stopService()
    late = await play(busy, f"echo late >> {ran}; echo late")
    assert late["error"]["code"] == -32004 and late["error"]["data"] == "the server is shutting down"
    assert (await first)["result"]["output"] == "first"
    await stopped
    assert busy.closed_code == 1001
    assert ran.read_text() == "first\n"  # the late one never reached a worker


@pytest_twisted.ensureDeferred
async def test_embedded_redis_by_default(start, tmp_path):
    state = tmp_path / "state"
    service, port = await serve(start, state_dir=str(state))
    pid = service.embedded_redis._transport.pid
    await serving(start(sh_worker(service.embedded_redis.address)))
    client = await RPCClient.open(port, CIRCLE)
    assert (await play(client, "echo embedded"))["result"] == {"output": "embedded"}
    client.close()
    await service.stopService()
    assert not os.path.exists(state / "redis.sock")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest_twisted.ensureDeferred
async def test_unencodable_script_is_invalid_params(redis_server, start):
    service, port = await serve(start, redis_server.url)
    client = await RPCClient.open(port, CIRCLE)
    client.protocol.sendMessage(b'{"jsonrpc":"2.0","id":"s","method":"play","params":{"script":"x\\ud800"}}')
    d = Deferred()
    client.factory.waiting["s"] = d
    reply = await d
    assert reply["error"]["code"] == -32602, reply
    assert (await client.call("whoami"))["result"]["circle"] == CIRCLE
    client.close()


@pytest_twisted.ensureDeferred
async def test_engine_output_with_lone_surrogate_still_answers(redis_server, start):
    service, port = await serve(start, redis_server.url)
    await serving(start(Worker(parse_redis_url(redis_server.url), [CIRCLE], lambda script, ctx: "a\ud800b",
                 reactor=reactor)))
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "x")
    assert reply["result"]["output"].startswith("a") and reply["result"]["output"].endswith("b")
    client.close()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")  # a zombie not reaped yet counts as gone
    except OSError:
        return True


@pytest_twisted.ensureDeferred
async def test_worker_timeout_is_32003_and_ends_the_scripts_children(redis_server, start, tmp_path):
    """A script stopped by the worker's own --script-timeout is answered as the server's deadline
    would be (-32003), and what it started in the background (holding its stdout) is gone too."""
    service, port = await serve(start, redis_server.url, script_timeout=60)
    await serving(start(sh_worker(parse_redis_url(redis_server.url), script_timeout=1)))
    client = await RPCClient.open(port, CIRCLE)
    pidfile = tmp_path / "pid"
    reply = await play(client, f"sleep 100 & echo $! > {pidfile}; echo started")
    assert reply["error"]["code"] == -32003, reply
    await eventually(lambda: _gone(int(pidfile.read_text())))
    client.close()


@pytest_twisted.ensureDeferred
async def test_output_over_the_servers_message_size_is_refused_by_the_worker(redis_server, start, redis_client):
    """The worker caps output at what the server can send (its --max-message-size, in the task):
    -32005 saying so, and nothing of the output in Redis."""
    service, port = await serve(start, redis_server.url, max_message_size=10_000)
    await serving(start(sh_worker(parse_redis_url(redis_server.url))))
    client = await RPCClient.open(port, CIRCLE)
    reply = await play(client, "yes")  # endless output
    assert reply["error"]["code"] == -32005
    assert reply["error"]["data"] == "output too large: more than 10000 bytes"
    [key] = redis_client("KEYS", "circles:task:*")
    assert "output" not in redis_client.hgetall(key)
    assert (await play(client, "head -c 9000 /dev/zero | tr '\\0' x"))["result"] == {"output": "x" * 9000}
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_script_nobody_waits_for_is_stopped_not_run_to_its_timeout(redis_server, start, tmp_path):
    # A client that leaves (or a play past the server's deadline) has its task expired; the
    # worker running it reads that within a second and kills the script, which would otherwise
    # hold a slot of the worker (and a process) until the worker's own timeout: here 120 s.
    _, port = await serve(start, redis_server.url, script_timeout=120)
    worker = await serving(start(sh_worker(parse_redis_url(redis_server.url), script_timeout=120)))
    trace = tmp_path / "trace"
    client = await RPCClient.open(port, CIRCLE)
    client.call("play", {"script": f"echo started > {trace}; sleep 100; echo finished >> {trace}"})
    await eventually(lambda: trace.exists() and len(worker._executions) == 1)
    client.close()  # nobody waits for it now
    await eventually(lambda: worker.stopped_tasks == 1 and not worker._executions)
    assert trace.read_text() == "started\n"
    # The worker's slot is free again: the next play runs at once.
    client = await RPCClient.open(port, CIRCLE)
    assert (await play(client, "echo next"))["result"] == {"output": "next"}
    client.close()
