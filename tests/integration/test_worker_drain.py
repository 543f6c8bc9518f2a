"""A worker stopped with SIGTERM drains: the scripts it runs finish and their results reach the
client; it takes no task from then on, and one queued meanwhile waits for another worker.

Real processes: a ``twistd circles`` server, ``twistd circles-worker`` workers, a real Redis.
"""

from __future__ import annotations

import json
import signal
import time

from websockets.sync.client import connect

from ..support import twistd
from .test_reliability import CIRCLE, WORKER_OPTIONS, _lines, _wait


def test_a_worker_stopped_with_sigterm_finishes_its_scripts_and_takes_no_new_one(tmp_path, redis_server,
                                                                               redis_client):
    started = tmp_path / "started"
    server_args = ["--listen", "tcp:0:interface=127.0.0.1", "-k", CIRCLE, "--redis-url", redis_server.url]
    # Two slots: the worker is waiting for a second task (a BLMOVE in flight) as it is stopped.
    worker_args = ["-k", CIRCLE, "--redis-url", redis_server.url, "--concurrency", "2", *WORKER_OPTIONS]
    queue = f"circles:queue:{CIRCLE}"
    with twistd(server_args, tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        url = f"ws://127.0.0.1:{port}/{CIRCLE}"
        with connect(url) as long_play, connect(url) as later_play:
            with twistd(worker_args, tmp_path, plugin="circles-worker") as draining:
                draining.wait_for("waiting for tasks")
                long_play.send(json.dumps({"jsonrpc": "2.0", "method": "play", "id": 1, "params": {
                    "script": f"echo long >> {started}; sleep 3; echo finished"}}))
                _wait(lambda: _lines(started) == ["long"], "the long play never started")
                draining.proc.send_signal(signal.SIGTERM)
                # Queued as the worker begins to stop, while its BLMOVE for a second task still
                # waits (it polls every second): not for it. (Before, that BLMOVE took it and the
                # stopping worker ran it: the test failed unless the poll ended within these 50 ms.)
                time.sleep(0.05)
                later_play.send(json.dumps({"jsonrpc": "2.0", "method": "play", "id": 2, "params": {
                    "script": f"echo later >> {started}; echo later"}}))
                reply = json.loads(long_play.recv(timeout=30))
                assert reply == {"jsonrpc": "2.0", "id": 1, "result": {"output": "finished"}}, reply
                assert draining.proc.wait(30) in (0, -signal.SIGTERM)
                assert "waiting for 1 running script(s) to finish" in draining.output
            # The later play waits in its queue, untouched (pending), for the next worker.
            assert redis_client("LLEN", queue) == 1, draining.output
            (task_id,) = redis_client("LRANGE", queue, 0, -1)
            assert redis_client.hgetall(f"circles:task:{task_id}")["status"] == "pending"
            assert _lines(started) == ["long"]
            with twistd(worker_args, tmp_path, plugin="circles-worker") as worker:
                worker.wait_for("waiting for tasks")
                reply = json.loads(later_play.recv(timeout=30))
                assert reply["result"] == {"output": "later"}, reply
        assert _lines(started) == ["long", "later"]
        assert redis_client("KEYS", "circles:processing:*") == []
    assert "Traceback" not in server.output + draining.output + worker.output
    assert "deregistered" in draining.output
