"""Every logger of the server and the worker obeys ``--log-level`` (circles.logs.Logger).

The client (:mod:`circles.client`) is left out on purpose: it runs in an application's process,
whose own observers decide what is kept; ``--log-level`` is the twistd plugins' option.
"""

from __future__ import annotations

import datetime
import importlib
import io
import json
import pkgutil

import twisted.logger

import circles
from circles import logs

from .support import Key, twistd


def _server_and_worker_modules() -> list:
    names = [info.name for info in pkgutil.walk_packages(circles.__path__, "circles.")]
    return [name for name in names if not (name == "circles.client" or name.startswith("circles.client."))
            and not name.endswith(".__main__")]  # a command: it runs when imported


def test_every_server_and_worker_logger_obeys_the_log_level():
    plain = []
    for name in _server_and_worker_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, twisted.logger.Logger) and not isinstance(value, logs.Logger):
                plain.append(f"{name}.{attribute}")
    assert plain == []
    assert {"circles.webhooks", "circles.backend.dispatch", "circles.worker.service"} <= set(_server_and_worker_modules())


REQUIRED = {"time", "level", "namespace", "message"}


def json_events(server) -> list:
    """Each line of a twistd run with ``--logger=circles.logs.json_observer``, read as a log
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
    with twistd(args, tmp_path, options=("--logger=circles.logs.json_observer",)) as server:
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
    assert started[0]["message"].endswith(started[0]["path"]) and isinstance(started[0]["pid"], int)
    assert [e for e in events if e["message"] == "Server Shut Down."]


def test_json_line_for_failures_and_values_json_cannot_hold():
    out = io.StringIO()
    log = twisted.logger.Logger(namespace="circles.test", observer=logs.json_observer(out))
    try:
        {}["missing"]
    except KeyError:
        log.failure("handling {what} failed", what=("a", 1), thing=object(), raw=b"\xff", ratio=float("inf"),
                    time=7, nested={1: [None, 2.5]})
    log.warn("multi\nline")
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["message"] == "handling ('a', 1) failed" and first["level"] == "critical"
    assert first["failure"].startswith("Traceback (most recent call last):")
    assert first["failure"].rstrip().endswith("KeyError: 'missing'")
    assert first["what"] == ["a", 1] and first["thing"].startswith("<object object at 0x")
    assert first["raw"] == "b'\\xff'" and first["ratio"] == "inf" and first["nested"] == {"1": [None, 2.5]}
    assert first["field_time"] == 7 and first["time"].endswith("Z")  # a field never hides the line's own keys
    assert second == {"time": second["time"], "level": "warn", "namespace": "circles.test", "message": "multi\nline"}
