"""What attacking a running server found, each with the bounded quantity
measured (entries kept, key recoveries done, log lines written), never a duration.

Here real servers, Redis and workers; a gateway in memory in tests/unit/test_attacks.py."""

from __future__ import annotations

import json
import re


def test_a_closed_connection_leaves_no_play_waiting_nor_a_task_for_a_worker(tmp_path, redis_server):
    """A real server, Redis and worker: a client queues plays no worker is there to run, hits
    --max-plays (100 by default) and hangs up; its tasks are expired at once, so the worker that comes later
    runs none of them."""
    from urllib.request import urlopen

    from websockets.sync.client import connect

    from ..support import Key, request, twistd

    circle = Key()
    redis = redis_server.client()
    redis.pretend_worker(circle.pubkey)  # live (so plays are queued), but it takes no task
    queue = f"circles:queue:{circle.pubkey}"
    in_flight = re.compile(r"^circles_tasks_in_flight (\S+)$", re.M)

    def waiting(port) -> float:
        return float(in_flight.search(urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode())[1])

    with twistd(["-k", circle.pubkey, "--listen", "tcp:0:interface=127.0.0.1", "--redis-url", redis_server.url],
                 tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30) as ws:
            ws.send(json.dumps([{"jsonrpc": "2.0", "method": "play", "params": {"script": "echo old"}}] * 100))
            refused = request(ws, "play", {"script": "echo 101st"}, id_=101)
            assert refused["error"]["code"] == -32006 and refused["error"]["data"] == {"max_plays": 100}
            _poll(lambda: redis("LLEN", queue) == 100)  # the server's writes may still be on their way
            assert waiting(port) == 100
        _poll(lambda: waiting(port) == 0)
        old = redis("LRANGE", queue, 0, -1)
        _poll(lambda: all(redis("HGET", f"circles:task:{task}", "status") == "expired" for task in old))
        # Nor their scripts: an expired task keeps no script for its remaining TTL (300 s).
        assert sum(redis("HSTRLEN", f"circles:task:{task}", "script") for task in old) == 0
        with twistd(["-k", circle.pubkey, "--redis-url", redis_server.url, "--exec", "sh {script_file}"], tmp_path,
                    plugin="circles-worker") as worker:
            worker.wait_for("waiting for tasks")
            with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30) as ws:
                assert request(ws, "play", {"script": "echo new"})["result"] == {"output": "new"}
        # The worker took the queue in order (FIFO): the old tasks before the new one, and ran none.
        assert [redis.hgetall(f"circles:task:{task}")["status"] for task in old] == ["expired"] * 100
        assert redis("LLEN", queue) == 0
    redis.close()


def _poll(predicate, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s"
        time.sleep(0.05)


def test_an_unterminated_string_of_escapes_is_a_parse_error_in_one_pass(tmp_path):
    """On a real server: a 1 MiB message of escaped quotes is refused (-32700) and the same
    connection is answered right after (it took the server hours of CPU before)."""
    from websockets.sync.client import connect

    from ..support import Key, request, twistd

    circle = Key()
    attack = '[' * 300 + '"' + '\\"' * (512 * 1024 - 200)
    with twistd(["-k", circle.pubkey, "--listen", "tcp:0:interface=127.0.0.1"], tmp_path) as server:
        port = server.wait_listening()
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30, max_size=None) as ws:
            ws.send(attack)
            assert json.loads(ws.recv(timeout=30))["error"]["code"] == -32700
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey


def test_plays_timing_out_write_a_bounded_log(tmp_path, redis_server):
    """A real server and Redis, no worker taking tasks: 400 plays with a tiny timeout wrote 400 info lines
    (one per play). Now the connection's first 3, then one summing up the rest at its close."""
    from websockets.sync.client import connect

    from ..support import Key, twistd

    circle = Key()
    with redis_server.client() as redis:
        redis.pretend_worker(circle.pubkey)  # live, so the plays are queued and time out
    with twistd(["-k", circle.pubkey, "--listen", "tcp:0:interface=127.0.0.1", "--redis-url", redis_server.url],
                tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30) as ws:
            for _ in range(4):
                ws.send(json.dumps([{"jsonrpc": "2.0", "method": "play", "params": {"script": "x", "timeout": 0.001},
                                     "id": i} for i in range(100)]))
                assert {r["error"]["code"] for r in json.loads(ws.recv(timeout=30))} == {-32003}
        server.wait_for("more anomalies not logged one by one")
        lines = [line for line in server.lines if " timed out after " in line]
        assert len(lines) == 3, lines
        [summary] = [line for line in server.lines if "more anomalies" in line]
        assert "397 more anomalies" in summary and "'script timed out': 397" in summary


def test_idle_timeouts_write_a_bounded_log(tmp_path):
    """60 connections left idle on a real server: 60 info lines before, now the gateway's 50 a
    minute, and the other 10 summed up in one line (written when the server stops)."""
    from contextlib import ExitStack

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from ..support import Key, twistd

    circle = Key()
    with twistd(["-k", circle.pubkey, "--listen", "tcp:0:interface=127.0.0.1", "--idle-timeout", "0.5",
                 "--ping-interval", "0"], tmp_path) as server:
        port = server.wait_listening()
        with ExitStack() as stack:
            clients = [stack.enter_context(connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30))
                       for _ in range(60)]
            for ws in clients:
                try:
                    ws.recv(timeout=60)
                except ConnectionClosed:
                    pass
                assert ws.close_code == 1000
    idle = [line for line in server.lines if "idle for" in line]
    assert len(idle) == 50
    [summary] = [line for line in server.lines if "sessions' anomalies: 10 more" in line]
    assert "'idle timeout': 10" in summary


def test_a_redis_refusing_writes_does_not_write_a_line_per_play(tmp_path, redis_server):
    """Redis at its maxmemory refuses every task: 300 plays answered -32004 wrote 300 warnings.
    Failed commands are logged the 1st, 10th and 100th (then every 1000th), each with the running
    count; and the 100 plays of one turn are one command (one ENQUEUE), after which the runner
    knows Redis is full and refuses without asking: one line for the 300."""
    from websockets.sync.client import connect

    from ..support import Key, twistd

    circle = Key()
    redis = redis_server.client()
    with twistd(["-k", circle.pubkey, "--listen", "tcp:0:interface=127.0.0.1", "--redis-url", redis_server.url],
                tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        redis.pretend_worker(circle.pubkey)  # so the plays get as far as writing their tasks
        redis("CONFIG", "SET", "maxmemory", "1")  # over it already: writes are refused (OOM)
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30) as ws:
            for _ in range(3):
                ws.send(json.dumps([{"jsonrpc": "2.0", "method": "play", "params": {"script": "x"}, "id": i}
                                    for i in range(100)]))
                assert {r["error"]["code"] for r in json.loads(ws.recv(timeout=30))} == {-32004}
        redis("CONFIG", "SET", "maxmemory", "0")
    warnings = [line for line in server.lines if "Redis command failed" in line]
    assert len(warnings) == 1 and "OOM" in warnings[0], warnings
    assert re.search(r"\((\d+) failed commands so far\)", warnings[0])[1] == "1"
    redis.close()


def test_no_request_body_is_parsed_as_a_form(tmp_path):
    """Twisted parses a POST body declared a form (multipart or URL-encoded) into ``request.args``
    before any route sees it: anyone posting 1 MiB of tiny fields to any route (``/health``
    included) cost the reactor 180-370 ms of CPU, against 2 ms for the same bytes as an opaque
    body. No route reads a form, so none is parsed. A multipart body without its boundary shows
    whether it was: parsed, it is Twisted's 400 (and the connection dropped); unparsed, the
    route's own answer."""
    import socket

    from ..support import Key, twistd

    def answer(port: int, content_type: bytes, body: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data.split(b"\r\n", 1)[0]

    with twistd(["-k", Key().pubkey, "--listen", "tcp:0:interface=127.0.0.1"], tmp_path) as server:
        port = server.wait_listening()
        assert answer(port, b"multipart/form-data", b"x") == b"HTTP/1.1 405 Method Not Allowed"
        fields = b"a=1&" * 200_000
        assert answer(port, b"application/x-www-form-urlencoded", fields) == b"HTTP/1.1 405 Method Not Allowed"
        part = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
        assert answer(port, b"multipart/form-data; boundary=b", part * 15_000 + b"--b--\r\n") == \
            b"HTTP/1.1 405 Method Not Allowed"
