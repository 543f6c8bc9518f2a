"""Logging for circles: ``twisted.logger`` with a process-wide level, set once at start-up.

twistd writes every event it is given, debug included, and formatting costs more than the
work being logged on per-message paths. So circles' loggers drop events below the configured
level (``info`` unless ``--log-level`` says otherwise) before anything is formatted.

What ``info`` shows is what an operator reads (the README's Operations section lists it, and
``tests/test_logs.py`` holds a real server to that list): so the factories circles listens and
connects with set Twisted's ``noisy`` off, and per-connection and per-task lines are ``debug``.

:func:`json_observer` writes the same events as one flat JSON object per line, for log shippers.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time

import twisted.logger
from twisted.logger import FileLogObserver, LogLevel
from twisted.python.failure import Failure

_ORDER = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 4}
LEVEL_NAMES = tuple(level.name for level in _ORDER)
_threshold = _ORDER[LogLevel.info]


def set_level(name: str) -> None:
    """Emit events at ``name`` (debug, info, warn, error, critical) and above from now on."""
    global _threshold
    _threshold = _ORDER[LogLevel.levelWithName(name)]


def enabled(level: LogLevel) -> bool:
    """Whether events at ``level`` are logged now: to skip building what only they would carry."""
    return _ORDER.get(level, 4) >= _threshold


class Logger(twisted.logger.Logger):
    """A ``twisted.logger.Logger`` that skips events below the level set by :func:`set_level`."""

    def emit(self, level: LogLevel, format=None, **kwargs) -> None:
        if _ORDER.get(level, 4) >= _threshold:
            super().emit(level, format, **kwargs)


def _level_name(text: str) -> str:
    if text not in LEVEL_NAMES:
        raise ValueError(f"{text!r} is not one of {', '.join(LEVEL_NAMES)}")
    return text


#: The ``--log-level`` option, shared by the twistd plugins (``usage.Options.optParameters``).
LOG_LEVEL_OPTION = ("log-level", None, "info", f"least severe events logged: {', '.join(LEVEL_NAMES)}", _level_name)


def worth_logging(n: int) -> bool:
    """Whether the ``n``-th refusal of a kind gets a log line: the 1st, 10th, 100th and every
    1000th, so a flood of refusals is a few lines with a running count, not one line each."""
    return n in (1, 10, 100) or n % 1000 == 0


#: What a JSON line names itself; a structured field of the same name is written as ``field_NAME``.
JSON_KEYS = ("time", "level", "namespace", "message", "failure", "system")
# Keys of legacy events (``twisted.python.log.msg``/``err``) that say again what the line says.
_LEGACY_KEYS = frozenset({"message", "time", "system", "isError", "format", "failure", "why"})


def json_line(event: dict) -> str:
    """One event as one flat JSON object, without a newline: ``time`` (ISO-8601, UTC), ``level``,
    ``namespace``, ``message`` (rendered), ``failure`` (the traceback, if the event has one),
    ``system`` (a legacy event's log prefix), then the event's own fields, each made JSON-safe.
    Twisted's own keys (``log_*``, legacy ones) are left out."""
    level = event.get("log_level")
    record = {
        "time": _iso_time(event.get("log_time")),
        "level": level.name if level in _ORDER else "info",
        "namespace": event.get("log_namespace") or "-",
        "message": _message(event),
    }
    legacy = event.get("log_namespace") == "log_legacy"
    failure = event.get("log_failure")
    if failure is None and legacy and isinstance(event.get("failure"), Failure):  # twisted.python.log.err
        failure = event["failure"]
        record["message"] = str(event.get("why") or "Unhandled Error")
    if failure is not None:
        record["failure"] = _traceback(failure)
    system = event.get("log_system")
    if system not in (None, "-"):
        record["system"] = str(system)
    for key, value in event.items():
        if key.startswith(("log_", "__")) or (legacy and key in _LEGACY_KEYS):
            continue
        record["field_" + key if key in JSON_KEYS else key] = _json_safe(value)
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _iso_time(when) -> str:
    if not isinstance(when, (int, float)):
        when = time.time()
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="microseconds") \
        .replace("+00:00", "Z")


def _message(event: dict) -> str:
    try:
        return twisted.logger.formatEvent(event)
    except Exception:  # formatEvent reports its own failures in its text; this is only a last resort
        return repr(event.get("log_format"))


def _traceback(failure) -> str:
    try:
        return failure.getTraceback().rstrip("\n")
    except Exception:
        return repr(failure)


def _json_safe(value, depth: int = 0):
    """``value`` as JSON: numbers (finite), strings, booleans and null as they are; lists, tuples
    and dicts element by element (keys as text); anything else as its text (its ``str`` if its
    class defines one, else its ``repr``)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth < 8:
        if isinstance(value, (list, tuple)):
            return [_json_safe(item, depth + 1) for item in value]
        if isinstance(value, dict):
            return {str(key): _json_safe(item, depth + 1) for key, item in value.items()}
    if isinstance(value, bytes):
        return repr(value)
    try:
        return str(value) if type(value).__str__ is not object.__str__ else repr(value)
    except Exception:
        return object.__repr__(value)


def json_observer(out=None) -> FileLogObserver:
    """A log observer writing one flat JSON object per event per line (:func:`json_line`) to
    ``out`` (stdout), for log shippers: ``twistd --logger=circles.logs.json_observer -n circles ...``."""
    return FileLogObserver(out if out is not None else sys.stdout, lambda event: _json_line_always(event) + "\n")


def twistd_logger_options(argv: "list[str] | None" = None, plugins=("circles", "circles-worker")) -> "list[str]":
    """The ``--logger`` option of the twistd command line this process runs under (``sys.argv``;
    twistd's own options, before the plugin's name), as a list to pass on to another twistd
    (``--processes``), so that every process writes the same kind of lines; ``[]`` if none."""
    args = list(sys.argv if argv is None else argv)[1:]
    for i, arg in enumerate(args):
        if arg in plugins:
            break
        if arg.startswith("--logger="):
            return [arg]
        if arg == "--logger" and i + 1 < len(args):
            return [f"--logger={args[i + 1]}"]
    return []


def _json_line_always(event: dict) -> str:
    # An observer that raises is dropped by Twisted's publisher: a line is written whatever the event holds.
    try:
        return json_line(event)
    except Exception as e:
        return json.dumps({"time": _iso_time(None), "level": "error", "namespace": "circles.logs",
                           "message": f"could not write an event as JSON: {type(e).__name__}: {e}",
                           "event": repr(event)[:2000]})
