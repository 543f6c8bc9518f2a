"""Logs as an operator and a log shipper meet them: every logger of the server and the worker
obeys ``--log-level`` (circles.common.logs.Logger); what a real server writes at ``info`` is a known list;
the worker's lines per task; ``--logger=circles.common.logs.json_observer`` writes flat JSON lines.

The client (:mod:`circles.client`) is left out on purpose: it runs in an application's process,
whose own observers decide what is kept; ``--log-level`` is the twistd plugins' option.

What real twistd processes write is in tests/integration/test_logs.py.
"""

from __future__ import annotations

import importlib
import io
import json
import pkgutil

import twisted.logger

import circles
from circles.common import logs


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


def test_json_line_for_legacy_events():
    """``twisted.python.log`` (what parts of Twisted still use): the message, the log prefix as
    ``system``, and an error's traceback in ``failure``, not in the message."""
    from twisted.python import log as legacy

    out = io.StringIO()
    observer = logs.json_observer(out)
    twisted.logger.globalLogPublisher.addObserver(observer)
    try:
        legacy.msg("port {} open", system="SomeFactory,3,127.0.0.1")
        try:
            1 / 0
        except ZeroDivisionError:
            legacy.err(None, "while adding")
    finally:
        twisted.logger.globalLogPublisher.removeObserver(observer)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    message, error = [e for e in events if e["namespace"] == "log_legacy"]
    assert (message["message"], message["system"]) == ("port {} open", "SomeFactory,3,127.0.0.1")
    assert message["level"] == "info"
    assert (error["message"], error["level"]) == ("while adding", "critical")
    assert error["failure"].startswith("Traceback") and error["failure"].endswith("division by zero")
    assert set(message) == {"time", "level", "namespace", "message", "system"} and "isError" not in error
