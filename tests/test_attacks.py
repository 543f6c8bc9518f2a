"""Issue 12, point 7: what attacking a running server found, each with the bounded quantity
measured (entries kept, key recoveries done, log lines written), never a duration."""

from __future__ import annotations

import json
import re

from twisted.internet.task import Clock

from circles.server.gateway import Gateway
from circles.server.config import Config

from .inmemory import NoScriptBackend, fired, open_session, replied
from .play_client import new_key, pk

CIRCLE = pk(new_key())


def _session(clock=None, **config):
    clock = clock if clock is not None else Clock()
    gateway = Gateway(Config(**config), clock, NoScriptBackend())
    return gateway, open_session(gateway, CIRCLE, connection_id=1)


def _send(session, message):
    text = replied(session.answer(json.dumps(message).encode("utf-8")))
    return None if text is None else json.loads(text)


def _request_series(gateway) -> list:
    return [line for line in gateway.metrics.exposition().decode().splitlines()
            if line.startswith("circles_requests_total{")]


# --- unknown method names do not stay in memory ----------------------------------------------------


def test_distinct_unknown_methods_keep_no_memory():
    gateway, session = _session(rate_limit=0)
    for i in range(300):
        name = f"no-such-method-{i}-" + "x" * 10_000
        assert _send(session, {"jsonrpc": "2.0", "method": name, "id": i})["error"]["code"] == -32601
        assert _send(session, {"jsonrpc": "2.0", "method": name + "-notification"}) is None
    # One series (and one cached child) for all of them: the label "unknown" with -32601.
    assert len(gateway.metrics._request_children) == 1
    [series] = _request_series(gateway)
    assert 'method="unknown"' in series and series.endswith(" 600.0")


def test_key_normalisation_cache_keeps_no_invalid_keys():
    """The LRU behind normalize_pubkey holds only valid keys (at most 132 characters each),
    however many huge or malformed ones an attacker sends."""
    from circles.common.keys import InvalidKey, _normalize, normalize_pubkey

    before = _normalize.cache_info().currsize
    for i in range(500):
        for text in (f"{i:x}" * 50_000, "02" + "00" * 32 + f"{i:x}", "zz" * 33, "02" + "00" * 32):
            try:
                normalize_pubkey(text)
            except InvalidKey:
                pass
    assert _normalize.cache_info().currsize == before
    assert _normalize.cache_info().maxsize == 4096


# --- a failed authenticate costs one signature check -----------------------------------------------


def test_failed_authenticate_costs_one_key_recovery_with_16_live_nonces(monkeypatch):
    import circles.common.signatures

    from .support import Key

    gateway, session = _session(rate_limit=0)
    user, stranger = Key(), Key()
    nonces = [_send(session, {"jsonrpc": "2.0", "method": "fetch_nonce", "params": [user.pubkey], "id": i})
              ["result"]["nonce"] for i in range(16)]
    recoveries = []
    original = circles.common.signatures.recover_eth_signer
    monkeypatch.setattr(circles.common.signatures, "recover_eth_signer", lambda *a: recoveries.append(1) or original(*a))
    bad = {"pubkey": user.pubkey, "signature": stranger.eth_sign(nonces[0])}
    for _ in range(10):
        reply = _send(session, {"jsonrpc": "2.0", "method": "authenticate", "params": bad, "id": 1})
        assert reply["error"]["code"] == -32002
    assert len(recoveries) == 10
    # Naming the nonce (an older one) works, at the same cost.
    good = {"pubkey": user.pubkey, "signature": user.eth_sign(nonces[2]), "nonce": nonces[2]}
    assert _send(session, {"jsonrpc": "2.0", "method": "authenticate", "params": good, "id": 2})["result"]["authenticated"]
    assert len(recoveries) == 11


# --- anomalies cannot flood the log, however many connections make them ---------------------------


def _info_lines(events) -> list:
    return [e for e in events if e.get("log_level") is not None and e["log_level"].name != "debug"]


def test_failed_authentications_on_many_connections_write_a_bounded_log():
    from .inmemory import captured_log
    from .support import Key

    clock = Clock()
    gateway = Gateway(Config(rate_limit=0), clock, NoScriptBackend())
    user = Key()
    with captured_log() as events:
        for conn in range(200):  # connections from two addresses, each failing 5 times
            session = open_session(gateway, CIRCLE, connection_id=conn, peer=f"198.51.100.{conn % 2}")
            nonce = _send(session, {"jsonrpc": "2.0", "method": "fetch_nonce", "params": [user.pubkey], "id": 0})
            bad = {"pubkey": user.pubkey, "signature": Key().eth_sign(nonce["result"]["nonce"])}
            for i in range(5):
                assert _send(session, {"jsonrpc": "2.0", "method": "authenticate", "params": bad, "id": i})["error"]
            session.anomalies.closed()
        assert len(_info_lines(events)) == 50  # the minute's budget
        clock.advance(60)
    lines = _info_lines(events)
    assert len(lines) == 51
    summary = lines[-1]
    # Each connection hands the budget its first 3 failures and, at close, one line for the
    # other 2: 800 lines asked for, 50 written, 750 summed up.
    assert summary["unlogged"] == 750
    assert summary["by_kind"] == {"authentication failed": 562, "connection summary": 188}  # 12 connections logged whole
    assert summary["busiest"] == {"198.51.100.0": 374, "198.51.100.1": 376}  # the 13th, from .0, half logged
    assert lines[0]["conn"] == 0 and lines[0]["peer"] == "198.51.100.0"


# --- plays waiting per connection are bounded, and die with the connection -------------------------


def _runner_session(**config):
    from twisted.internet.defer import Deferred
    from zope.interface import implementer

    from circles.backend.scripts import IScriptRunner

    @implementer(IScriptRunner)
    class Runner:
        def __init__(self):
            self.pending = []
            self.cancelled = 0

        def run(self, request):
            d = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
            self.pending.append(d)
            return d

    runner = Runner()
    gateway = Gateway(Config(**config), Clock(), runner)
    return gateway, open_session(gateway, CIRCLE, connection_id=1), runner


def _play(session, id_=None):
    message = {"jsonrpc": "2.0", "method": "play", "params": {"script": "x"}}
    if id_ is not None:
        message["id"] = id_
    return session.answer(json.dumps(message).encode("utf-8"))


def test_plays_waiting_on_one_connection_are_capped():
    gateway, session, runner = _runner_session(rate_limit=0, max_plays=3)
    waiting = [_play(session), _play(session), _play(session, 3)]  # notifications count too
    assert len(runner.pending) == 3 and len(session.plays) == 3
    refused = json.loads(_play(session, 4))
    assert refused["error"] == {"code": -32006, "message": "Too many requests: 3 plays already wait on this connection",
                                "data": {"max_plays": 3}}
    assert _play(session) is None  # a notification over the cap is dropped, not queued
    assert len(runner.pending) == 3
    runner.pending[2].callback("done")  # one answered: room for one more
    assert json.loads(fired(waiting[2]))["result"] == {"output": "done"}
    assert len(session.plays) == 2
    _play(session, 5)
    assert len(runner.pending) == 4 and len(session.plays) == 3


def test_closing_a_connection_cancels_its_plays_without_a_reply_or_a_traceback():
    from .inmemory import captured_log

    gateway, session, runner = _runner_session(rate_limit=0)
    replies = [_play(session, i) for i in range(5)] + [_play(session)]
    batch = session.answer(json.dumps([{"jsonrpc": "2.0", "method": "play", "params": ["y"], "id": "b"}]))
    with captured_log() as events:
        session.close()
    assert runner.cancelled == 7 and not session.plays
    assert [fired(reply) for reply in replies] == [None] * 6  # nothing to send: nobody is there
    assert fired(batch) is None and session.in_flight == 0
    assert not [e for e in events if e.get("log_failure") is not None]
    # Counted as cancelled; the play-time histogram only sees plays that were answered.
    assert 'circles_requests_total{method="play",outcome="cancelled"} 7.0' in _request_series(gateway)
    assert "circles_play_seconds_count 0.0" in gateway.metrics.exposition().decode()


def test_a_closed_connection_leaves_no_play_waiting_nor_a_task_for_a_worker(tmp_path, redis_server):
    """A real server, Redis and worker: a client queues plays no worker is there to run, hits
    --max-plays (100 by default) and hangs up; its tasks are expired at once, so the worker that comes later
    runs none of them."""
    from urllib.request import urlopen

    from websockets.sync.client import connect

    from .support import Key, request, twistd

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


# --- the nesting check is linear, whatever the strings look like -----------------------------------

#: Texts past the cheap bracket count whose strings do not close (invalid JSON, as an attacker
#: sends it): an unterminated string of escaped quotes, of escaped backslashes and quotes, one
#: ending in a lone backslash.
_UNTERMINATED = ['[' * 300 + '"' + '\\"' * 1000, '[' * 300 + ('"' + '\\' * 3) * 1000,
                 '{' * 300 + '"a\\' * 1000, '[' * 300 + '"' + '\\' * 1001]


def test_a_string_match_starting_at_any_quote_never_fails():
    """The depth check strips strings with one regex pass. A match that could fail after
    scanning to the end of the text would be tried again from the next quote: quadratic work, a
    1 MiB message holding the CPU for hours. So from every quote the pattern matches."""
    from circles.common.jsonrpc import _STRING

    for text in _UNTERMINATED:
        quotes = [i for i, c in enumerate(text) if c == '"']
        assert quotes and all(_STRING.match(text, i) for i in quotes)


def test_an_unterminated_string_of_escapes_is_a_parse_error_in_one_pass(tmp_path):
    """On a real server: a 1 MiB message of escaped quotes is refused (-32700) and the same
    connection is answered right after (it took the server hours of CPU before)."""
    from websockets.sync.client import connect

    from .support import Key, request, twistd

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

    from .support import Key, twistd

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

    from .support import Key, twistd

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
    Now the 1st, 10th and 100th (then every 1000th), each with the running count."""
    from websockets.sync.client import connect

    from .support import Key, twistd

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
    assert len(warnings) == 3 and "OOM" in warnings[0]
    assert [re.search(r"\((\d+) failed commands so far\)", line)[1] for line in warnings] == ["1", "10", "100"]
    redis.close()
