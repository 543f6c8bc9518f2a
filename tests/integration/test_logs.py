"""Logs as an operator and a log shipper meet them: every logger of the server and the worker
obeys ``--log-level`` (circles.common.logs.Logger); what a real server writes at ``info`` is a known list;
the worker's lines per task; ``--logger=circles.common.logs.json_observer`` writes flat JSON lines.

The client (:mod:`circles.client`) is left out on purpose: it runs in an application's process,
whose own observers decide what is kept; ``--log-level`` is the twistd plugins' option.

The log level of every logger and the JSON lines, in this process: tests/unit/test_logs.py.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
import twisted.logger

from circles.common import logs
from devtools.twistd import TWISTD

from ..support import Key, request, twistd

REQUIRED = {"time", "level", "namespace", "message"}


def json_events(server) -> list:
    """Each line of a twistd run with ``--logger=circles.common.logs.json_observer``, read as a log
    shipper reads it: one JSON object per line, every line."""
    lines = [line for line in server.lines if line.strip()]
    events = [json.loads(line) for line in lines]
    for event in events:
        assert isinstance(event, dict) and REQUIRED <= set(event), event
        when = datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        assert when.utcoffset() == datetime.timedelta(0) and event["time"].endswith("Z")
        assert event["level"] in logs.LEVEL_NAMES and isinstance(event["message"], str)
        assert not [key for key in event if key.startswith("log_") or "__" in key], event
    assert "__class_uuid__" not in server.output and "unpersistable" not in server.output
    return events


def test_json_observer_writes_one_flat_object_per_line_from_a_real_twistd(tmp_path):
    circle = Key()
    args = ["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1", "--state-dir", str(tmp_path / "state")]
    with twistd(args, tmp_path, options=("--logger=circles.common.logs.json_observer",)) as server:
        server.wait_listening()
        server.wait_for("connected to Redis")
    events = json_events(server)
    assert len(events) >= 5
    [accepting] = [e for e in events if e["message"].startswith("accepting at most ")]
    assert accepting["namespace"] == "circles.service" and accepting["level"] == "info"
    assert accepting["reserve"] == 100 and accepting["pending"] == 512 and isinstance(accepting["limit"], int)
    assert f"--fd-reserve {accepting['reserve']}" in accepting["message"]
    started = [e for e in events if e["message"].startswith("started a private redis-server")]
    assert started and started[0]["path"] == str(tmp_path / "state" / "redis.sock")
    assert f"on {started[0]['path']}" in started[0]["message"] and isinstance(started[0]["redis_pid"], int)
    assert [e for e in events if e["message"] == "Server Shut Down."]


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[([^\]#]+)(?:#(\w+))?\] (.*)$")

#: Every kind of line a server at the default level writes over its life when, besides one play
#: that times out, nothing goes wrong (README, Operations: what ``info`` shows), as (namespace,
#: the message as a pattern).
SERVER_AT_INFO = {
    ("twisted.scripts._twistd_unix.UnixAppLogger", r"twistd \S+ \(\S+ \S+\) starting up\."),
    ("twisted.scripts._twistd_unix.UnixAppLogger", r"reactor class: \S+\."),
    ("circles.service", r"accepting at most \d+ connections at once \(the descriptor limit less --fd-reserve 100\); "
                        r"at most 512 from one address before their request \(--max-pending-per-ip\)"),
    ("circles.service", r"webhooks: Stripe on \(2 secrets\), iDenfy on \(own secrets for 1 circle\)"),
    # where the Redis URL and the secrets came from: names, never values
    ("circles.server_tap", r"configuration: Redis URL from --redis-url"),
    ("circles.server_tap", r"configuration: Stripe webhook secrets from \$CIRCLES_STRIPE_WEBHOOK_SECRET"),
    ("circles.server_tap", r"configuration: iDenfy webhook secrets from --idenfy-secret-file"),
    ("circles.backend.runner", r"script dispatch through Redis at redis://127\.0\.0\.1:\d+/0, "
                                 r"reply list circles:reply:[0-9a-f]+"),
    ("-", r"circles starting on \d+"),
    ("circles.backend.runner", r"connected to Redis at redis://127\.0\.0\.1:\d+/0"),
    # a session's lines at info are its anomalies (here: its play that timed out), nothing else
    ("circles.common.log_budget", r"connection \d+: a play on circle [0-9a-f]{66} timed out "
                          r"\(stopped by the worker at its --script-timeout\)"),
    ("twisted.internet.base", r"Received SIGTERM, shutting down\."),
    # /ready was asked: the drain grace, and its end
    ("circles.service", r"shutting down: /ready answers 503; still accepting for 5s \(--drain-grace\) so that "
                        r"load balancers send traffic elsewhere first"),
    ("circles.service", r"shutting down: no longer accepting; 0 connection\(s\) close with 1001 once their calls "
                        r"are answered"),
    ("-", r"\(TCP Port \d+ Closed\)"),
    ("twisted.internet.base", r"Main loop terminated\."),
    ("twisted.scripts._twistd_unix.UnixAppLogger", r"Server Shut Down\."),
}


def kinds(output: str, expected: set) -> list:
    """The kind of each line of a text log (the ``expected`` one it matches); a line of no
    expected kind, or a line that is not a log line (a traceback's), fails the test."""
    found = []
    for line in output.splitlines():
        match = TEXT_LINE.match(line)
        assert match, f"not a log line: {line!r}"
        namespace, level, message = match.groups()
        [kind] = [kind for kind in expected if kind[0] == namespace and re.fullmatch(kind[1], message)] or \
            [f"unexpected line: {line}"]
        assert level in (None, "info"), line
        found.append(kind)
    return found


def test_a_server_at_info_says_what_an_operator_reads_and_a_worker_logs_each_task(tmp_path, monkeypatch, redis_server):
    """A server at the default level, with webhooks on and a session that authenticates and
    plays, writes start-up and shutdown lines only (no factory lines, no object reprs); its worker
    at debug writes one line per task with its outcome and duration, and a warning per failed
    task with the reason, without a traceback."""
    circle, user = Key(), Key()
    monkeypatch.setenv("CIRCLES_STRIPE_WEBHOOK_SECRET", "whsec_one,whsec_two")
    monkeypatch.delenv("CIRCLES_IDENFY_WEBHOOK_SECRET", raising=False)
    secrets_file = tmp_path / "idenfy.secrets"
    secrets_file.write_text(f"{circle.pubkey} idenfy-secret\n")
    secrets_file.chmod(0o600)
    redis = ["--redis-url", redis_server.url]
    args = ["--auth", "-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1", *redis,
            "--idenfy-secret-file", str(secrets_file)]
    worker_args = ["-k", circle.pubkey, "--exec", "sh {script_file}", "--script-timeout", "1", *redis,
                   "--log-level", "debug"]
    with twistd(args, tmp_path) as server, \
            twistd(worker_args, tmp_path, plugin="circles-worker",
                   options=("--logger=circles.common.logs.json_observer",)) as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        from websockets.sync.client import connect
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(
                request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"])})["result"]
            assert request(ws, "play", {"script": "echo hello"}, 2)["result"] == {"output": "hello"}
            failed = request(ws, "play", {"script": "echo first >&2; echo second >&2; exit 3"}, 3)["error"]
            assert failed["code"] == -32005
            assert request(ws, "play", {"script": "sleep 5"}, 4)["error"]["code"] == -32003
        # Webhook deliveries, one new and one redelivered: counted in /metrics, a line each at debug
        # only (README: at info, nothing per event).
        from devtools.webhook_support import encode, post_sync, stripe_event, stripe_headers
        body = encode(stripe_event("evt_logs"))
        for _ in range(2):
            status, _answer = post_sync(port, f"/webhooks/stripe/{circle.pubkey}", body,
                                        stripe_headers(body, secret="whsec_two"))
            assert status == 200
        for path in ("/health", "/ready", "/metrics"):  # probes and scrapes: no access log at info
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                assert response.status == 200
                if path == "/metrics":
                    assert 'circles_webhooks_total{provider="stripe",status="200"} 2.0' in response.read().decode()
        worker.wait_for("(timeout)")
    found = kinds(server.output, SERVER_AT_INFO)
    assert set(found) == SERVER_AT_INFO, server.output
    assert "Starting factory" not in server.output and "object at 0x" not in server.output

    events = json_events(worker)
    events = [e for e in events if e.get("source") != "webhook:stripe"]  # the event's task (sh fails it)
    done = [e for e in events if e["level"] == "debug" and "outcome" in e]
    assert [e["outcome"] for e in done] == ["completed", "error", "error (timeout)"]
    assert {e["circle"] for e in done} == {circle.pubkey} and len({e["task"] for e in done}) == 3
    assert all(e["message"] == f"task {e['task']} for circle {circle.pubkey} ({e['source']}): {e['outcome']} "
                               f"in {e['duration']:.3f}s" for e in done)
    assert done[0]["duration"] < 1 <= done[2]["duration"]
    warnings = [e for e in events if e["level"] == "warn"]
    assert [(e["task"], e["reason"]) for e in warnings] == [(done[1]["task"], "error"), (done[2]["task"], "timeout")]
    assert "second" not in warnings[0]["why"] and "first" in warnings[0]["why"], warnings[0]
    assert warnings[1]["why"].startswith("timeout: script timed out")
    assert not [e for e in events if e["level"] in ("error", "critical") or "failure" in e]
    assert "Traceback" not in worker.output


@pytest_twisted.ensureDeferred
async def test_an_engine_that_raises_is_one_warning_with_the_reason_and_its_traceback_only_at_debug(
        redis_server, start):
    """A bug in an ``--engine`` callable fails its task (the caller gets the error) with one
    warning naming the task and the exception; the traceback is a debug event of its own."""
    from twisted.internet import reactor

    from circles.backend.dispatch import RedisScriptRunner
    from circles.backend.redis_url import parse_redis_url
    from circles.backend.scripts import ScriptFailed, ScriptRequest
    from circles.worker.service import Worker

    from ..play_client import eventually

    def buggy_engine(script, context):
        return {}["no such key"]

    circle = Key().pubkey
    address = parse_redis_url(redis_server.url)
    runner = start(RedisScriptRunner(address, reactor=reactor))
    worker = start(Worker(address, [circle], buggy_engine, reactor=reactor))
    await eventually(runner.is_connected)
    await eventually(lambda: worker.registered)
    out = io.StringIO()
    observer = logs.json_observer(out)
    twisted.logger.globalLogPublisher.addObserver(observer)
    try:
        logs.set_level("debug")
        with pytest.raises(ScriptFailed) as failed:
            await runner.run(ScriptRequest(circle=circle, script="x", caller="", source="ws", timeout=20))
        await eventually(lambda: '"outcome"' in out.getvalue())
    finally:
        logs.set_level("info")
        twisted.logger.globalLogPublisher.removeObserver(observer)
    assert failed.value.detail == "KeyError: 'no such key'"
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    events = [e for e in events if e["namespace"] == "circles.worker.service"]
    [warning] = [e for e in events if e["level"] == "warn"]
    assert warning["why"] == "KeyError: 'no such key'" and warning["reason"] == "error" and "failure" not in warning
    assert warning["message"].startswith(f"task {warning['task']} for circle {circle} failed after ")
    [raised] = [e for e in events if "failure" in e]
    assert raised["level"] == "debug" and raised["task"] == warning["task"]
    assert "buggy_engine" in raised["failure"] and raised["failure"].rstrip().endswith("KeyError: 'no such key'")
    [done] = [e for e in events if "outcome" in e]
    assert (done["task"], done["outcome"], done["source"]) == (warning["task"], "error", "ws")


def test_the_other_processes_of_processes_write_json_too(tmp_path):
    """``--processes 2`` with the JSON logger: the second process is started with the same
    ``--logger``, so a log shipper reads every line of both."""
    circle = Key()
    args = ["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1", "--processes", "2",
            "--state-dir", str(tmp_path / "state")]
    with twistd(args, tmp_path, options=("--logger", "circles.common.logs.json_observer")) as server:
        server.wait_for("started server process 2")
        deadline = time.monotonic() + 60
        while server.output.count("connected to Redis") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    events = json_events(server)
    assert len([e for e in events if re.fullmatch(r"circles starting on \d+", e["message"])]) == 2
    assert len([e for e in events if e["message"].startswith("connected to Redis")]) == 2


def test_ctrl_c_on_processes_stops_them_all_without_a_traceback(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the other processes of
    ``--processes`` used to get it as well as the first one's SIGTERM, and logged a critical
    ReactorNotRunning traceback; now they lead sessions of their own and are stopped once."""
    circle = Key()
    command = [TWISTD, "-n", "--pidfile=", "--logfile=-", "circles", "-k", circle.pubkey, "--port", "0",
               "--interface", "127.0.0.1", "--processes", "2", "--state-dir", str(tmp_path / "state")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True,  # a terminal's process group, with twistd in front
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while "".join(lines).count("connected to Redis") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "".join(lines).count("connected to Redis") == 2, "".join(lines)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(10)
    output = "".join(lines)
    assert output.count("Server Shut Down.") == 2, output
    assert "Traceback" not in output and "#critical]" not in output and "#error]" not in output, output
    assert process.returncode == -signal.SIGINT


def test_the_access_log_is_debug_and_never_has_the_query_string(tmp_path):
    circle = Key()
    args = ["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1", "--log-level", "debug",
            "--state-dir", str(tmp_path / "state")]
    with twistd(args, tmp_path, options=("--logger=circles.common.logs.json_observer",)) as server:
        port = server.wait_listening()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/auth/nonce?public_key=0xquerysecret", timeout=30)
        assert refused.value.code == 400
        server.wait_for('"path":"/auth/nonce"')
    events = json_events(server)
    access = [e for e in events if e["namespace"] == "circles.server.http.site"]
    assert [(e["level"], e["method"], e["path"], e["status"]) for e in access] == \
        [("debug", "GET", "/health", 200), ("debug", "GET", "/auth/nonce", 400)]
    assert access[0]["message"] == f"GET /health 200 ({access[0]['size']} bytes) from 127.0.0.1"
    assert access[0]["peer"] == "127.0.0.1" and access[0]["user_agent"].startswith("Python-urllib")
    assert "querysecret" not in server.output
