"""What operators use: /health, /ready, /metrics (also on --metrics-listen), JSON logs."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import pytest_twisted
from twisted.internet import reactor, threads

from circles.backend.redis_url import parse_redis_url
from circles.worker.service import Worker

from ..play_client import RPCClient, eventually, new_key, pk, sleep
from ..support import Key, request, twistd
from .test_play_ws import CIRCLE, serve


def _get(url: str):
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status, response.headers.get("content-type"), response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("content-type"), e.read().decode()
    return threads.deferToThread(fetch)


def _sample(exposition: str, name: str, **labels) -> float:
    """The value of one sample in the Prometheus text format (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in exposition.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        if metric == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


@pytest_twisted.ensureDeferred
async def test_health_and_ready_follow_redis(redis_server, start):
    service, port = await serve(start, redis_server.url)
    base = f"http://127.0.0.1:{port}"
    assert (await _get(base + "/health"))[::2] == (200, '{"status":"ok"}')
    assert (await _get(base + "/ready"))[::2] == (200, '{"status":"ready"}')
    redis_server.kill()
    await eventually(lambda: not service.script_runner.is_connected())
    status, _, body = await _get(base + "/ready")
    assert status == 503 and json.loads(body)["reason"] == "script backend unavailable"
    assert (await _get(base + "/health"))[0] == 200  # alive all the same
    redis_server.start()
    await eventually(service.script_runner.is_connected)
    assert (await _get(base + "/ready"))[0] == 200
    status, _, body = await _get(base + "/metrics")
    assert _sample(body, "circles_redis_reconnects_total") == 1


@pytest_twisted.ensureDeferred
async def test_ready_follows_a_redis_that_does_not_answer(redis_server, start):
    """With Redis stopped (SIGSTOP: connected, silent) /ready said 200 throughout."""
    service, port = await serve(start, redis_server.url)
    base = f"http://127.0.0.1:{port}"
    client = await RPCClient.open(port, CIRCLE)
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        status, _, body = await _ready_unavailable(base)
        assert status == 503 and json.loads(body)["reason"] == "script backend unavailable"
        assert (await client.call("play", {"script": "x"}))["error"]["code"] == -32004
        assert (await _get(base + "/health"))[0] == 200
        # However long Redis stays silent, one PING waits for it, never a pile of them.
        sent = service.script_runner.health.pings
        await sleep(3)  # three ping intervals
        assert service.script_runner.health.pings == sent
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await eventually(service.script_runner.is_connected, timeout=60)
    assert (await _get(base + "/ready"))[0] == 200
    client.close()


async def _ready_unavailable(base: str, polls: int = 600):
    """The first /ready answer that is not 200 (polled every 0.1 s, at most ``polls`` times)."""
    for _ in range(polls):
        answer = await _get(base + "/ready")
        if answer[0] != 200:
            return answer
        await sleep(0.1)
    raise AssertionError("/ready stayed 200")


@pytest_twisted.ensureDeferred
async def test_ready_is_503_while_shutting_down(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url, shutdown_grace=30)
    redis_client.pretend_worker(CIRCLE)
    client = await RPCClient.open(port, CIRCLE)
    in_flight = client.call("play", {"script": "nobody runs this", "timeout": 2})
    await eventually(lambda: service.script_runner.in_flight == 1)
    service.factory.draining = True  # what stopService sets first (it also closes the port)
    status, _, body = await _get(f"http://127.0.0.1:{port}/ready")
    assert status == 503 and json.loads(body)["reason"] == "shutting down"
    service.factory.draining = False
    await in_flight


@pytest_twisted.ensureDeferred
async def test_metrics(redis_server, start):
    service, port = await serve(start, redis_server.url, auth_required=True)
    worker = start(Worker(parse_redis_url(redis_server.url), [CIRCLE], lambda script, ctx: script, reactor=reactor))
    await eventually(lambda: worker.registered)
    base = f"http://127.0.0.1:{port}"
    client = await RPCClient.open(port, CIRCLE)
    await client.authenticate(new_key())
    assert "result" in await client.call("play", {"script": "hi"})
    bad = await client.call("authenticate", {"pubkey": pk(new_key()), "signature": "00" * 65})
    assert bad["error"]["code"] == -32002
    assert (await client.call("no_such_method"))["error"]["code"] == -32601
    status, content_type, body = await _get(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert _sample(body, "circles_connections_open") == 1
    assert _sample(body, "circles_requests_total", method="fetch_nonce", outcome="ok") == 1
    assert _sample(body, "circles_requests_total", method="authenticate", outcome="ok") == 1
    assert _sample(body, "circles_requests_total", method="authenticate", outcome="-32002") == 1
    assert _sample(body, "circles_requests_total", method="play", outcome="ok") == 1
    assert _sample(body, "circles_requests_total", method="unknown", outcome="-32601") == 1
    assert _sample(body, "circles_authentications_total", result="success") == 1
    assert _sample(body, "circles_authentications_total", result="failure") == 1
    assert _sample(body, "circles_play_seconds_count") == 1
    assert _sample(body, "circles_tasks_in_flight") == 0
    client.close()
    await eventually(lambda: not service.factory.open_connections)
    assert _sample((await _get(base + "/metrics"))[2], "circles_connections_open") == 0


@pytest_twisted.ensureDeferred
async def test_metrics_on_their_own_port(redis_server, start, tmp_path):
    import socket
    with socket.socket() as s:  # a free port for the metrics endpoint
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    service, port = await serve(start, redis_server.url, metrics_listen=f"tcp:{metrics_port}:interface=127.0.0.1")
    await service.when_listening()
    status, _, body = await _get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200 and "circles_connections_open" in body
    assert (await _get(f"http://127.0.0.1:{port}/metrics"))[0] == 404  # not on the public port


def test_json_logs_with_a_connection_id_and_no_secrets(tmp_path):
    circle, user = Key(), Key()
    args = ["--auth", "-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"]
    with twistd(args, tmp_path, options=("--logger=circles.common.logs.json_observer",)) as server:
        port = server.wait_listening()
        from websockets.sync.client import connect
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"]
            signature = user.eth_sign(nonce)
            wrong = Key().eth_sign(nonce)
            assert "error" in request(ws, "authenticate", {"pubkey": user.pubkey, "signature": wrong})
            assert "result" in request(ws, "authenticate", {"pubkey": user.pubkey, "signature": signature})
            request(ws, "play", {"script": "let secret_script_body = 1;", "timeout": 0.2})
        server.wait_for("authentication failed")
    events = [json.loads(line) for line in server.lines if line.strip().startswith("{")]
    assert events and len(events) == len([line for line in server.lines if line.strip()])
    # At the default level a session's lines are its anomalies (here the failed attempt); the
    # per-connection open/close lines are debug, as they would be one per handshake.
    failed = [e for e in events if "authentication failed" in e["message"]]
    assert failed and failed[0]["conn"] and failed[0]["circle"] == circle.pubkey
    assert not [e for e in events if e["message"].startswith(f"connection {e.get('conn')} closed")]
    assert wrong.removeprefix("0x") not in server.output
    assert signature.removeprefix("0x") not in server.output
    assert "secret_script_body" not in server.output


def test_debug_logs_name_each_connection_as_it_closes(tmp_path):
    circle, user = Key(), Key()
    args = ["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1", "--log-level", "debug"]
    with twistd(args, tmp_path, options=("--logger=circles.common.logs.json_observer",)) as server:
        port = server.wait_listening()
        from websockets.sync.client import connect
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"]
            signature = user.eth_sign(nonce)
            assert "result" in request(ws, "authenticate", {"pubkey": user.pubkey, "signature": signature})
        server.wait_for("closed (code")
    events = [json.loads(line) for line in server.lines if line.strip().startswith("{")]
    closed = [e for e in events if e["message"].startswith(f"connection {e.get('conn')} closed")]
    assert closed and closed[0]["conn"] and closed[0]["pubkey"] == user.pubkey
    assert signature.removeprefix("0x") not in server.output
