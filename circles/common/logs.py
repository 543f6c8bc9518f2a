"""Logging for circles: ``twisted.logger`` with a process-wide level, set once at start-up.

twistd writes every event it is given, debug included, and formatting costs more than the
work being logged on per-message paths. So circles' loggers drop events below the configured
level (``info`` unless ``--log-level`` says otherwise) before anything is formatted.

What ``info`` shows is what an operator reads (the README's Operations section lists it, and
``tests/test_logs.py`` holds a real server to that list): so the factories circles listens and
connects with set Twisted's ``noisy`` off, and per-connection and per-task lines are ``debug``.

:func:`json_observer` writes the same events as one flat JSON object per line, for log shippers.

Under ``--processes N`` the processes have one log: each other process writes its events to its
standard output with :func:`relay_observer`, one line of Twisted's own JSON form each (every
value already rendered, so nothing is lost on the way), and the first process reads those lines
(:class:`circles.server.processes.group.ServerProcesses`) and publishes them as its own events, which go
to whatever ``--logfile`` or ``--logger`` twistd was given. :class:`ProcessTags` gives every
event the ``pid`` and ``process`` (1 to N, as the log lines name them) of the process it came from,
as fields (JSON lines) and in the text line's ``[system]`` column.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import IO, Any

import twisted.logger
from twisted.logger import FileLogObserver, ILogObserver, LogLevel, eventAsJSON, eventFromJSON
from twisted.python.failure import Failure
from zope.interface import implementer

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

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
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
    level: Any = event.get("log_level")
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
    system = event["log_circles_system"] if "log_circles_system" in event else event.get("log_system")
    if system not in (None, "-"):
        record["system"] = str(system)
    for key, value in event.items():
        if key.startswith(("log_", "__")) or (legacy and key in _LEGACY_KEYS):
            continue
        record["field_" + key if key in JSON_KEYS else key] = _json_safe(value)
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _iso_time(when: Any) -> str:
    if not isinstance(when, (int, float)):
        when = time.time()
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="microseconds") \
        .replace("+00:00", "Z")


def _message(event: dict) -> str:
    try:
        return twisted.logger.formatEvent(event)
    except Exception:  # formatEvent reports its own failures in its text; this is only a last resort
        return repr(event.get("log_format"))


def _traceback(failure: Any) -> str:
    try:
        return failure.getTraceback().rstrip("\n")
    except Exception:
        return repr(failure)


def _json_safe(value: Any, depth: int = 0) -> Any:
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


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """A log observer writing one flat JSON object per event per line (:func:`json_line`) to
    ``out`` (stdout), for log shippers: ``twistd --logger=circles.common.logs.json_observer -n circles ...``."""
    return FileLogObserver(out if out is not None else sys.stdout, lambda event: _json_line_always(event) + "\n")


def _json_line_always(event: dict) -> str:
    # An observer that raises is dropped by Twisted's publisher: a line is written whatever the event holds.
    try:
        return json_line(event)
    except Exception as e:
        return json.dumps({"time": _iso_time(None), "level": "error", "namespace": "circles.common.logs",
                           "message": f"could not write an event as JSON: {type(e).__name__}: {e}",
                           "event": repr(event)[:2000]})


#: The longest line a process of ``--processes`` relays (bytes of UTF-8); a longer event goes as
#: its first part, saying so.
RELAY_LINE_LIMIT = 64 * 1024
# What a relayed event keeps of Twisted's own keys (the rest are objects of the sending process).
_RELAYED_KEYS = frozenset({"log_level", "log_namespace", "log_time", "log_system"})


def relay_observer(out: IO[str] | None = None) -> FileLogObserver:
    """A log observer writing each event as one line for the first process of ``--processes`` to
    read (:func:`relayed_event`): ``twistd --logger=circles.common.logs.relay_observer``, as it starts the
    others."""
    return FileLogObserver(out if out is not None else sys.stdout, lambda event: relay_line(event) + "\n")


def relay_line(event: dict) -> str:
    """``event`` as one line of Twisted's JSON form (``eventAsJSON``), at most
    :data:`RELAY_LINE_LIMIT` bytes: its message already rendered, a traceback as text
    (``log_traceback``), its own fields made JSON-safe as :func:`json_line` writes them."""
    try:
        line = eventAsJSON(_relayable(event))
        if len(line) > RELAY_LINE_LIMIT:  # ASCII: escaped as JSON (and the text twice, in log_flattened)
            message = _message(event)
            line = eventAsJSON({
                "log_format": "{text}", "log_level": event.get("log_level"),
                "log_namespace": event.get("log_namespace") or "-", "log_time": event.get("log_time"),
                "text": message[:RELAY_LINE_LIMIT // 32] + f"... (event of {len(line)} characters cut short)"})
        return line
    except Exception as e:  # an observer that raises is dropped by Twisted's publisher
        return eventAsJSON({"log_format": "could not relay an event: {error}", "log_level": LogLevel.error,
                            "log_namespace": "circles.common.logs", "error": f"{type(e).__name__}: {e}"[:2000]})


def _relayable(event: dict) -> dict:
    out: dict = {key: value for key, value in event.items() if key in _RELAYED_KEYS}
    # The message as this process renders it, as a format that renders to it: what it says
    # depends on objects only this process has.
    out["log_format"] = _message(event).replace("{", "{{").replace("}", "}}")
    failure = event.get("log_failure")
    if failure is not None:
        out["log_traceback"] = _traceback(failure)
    for key, value in event.items():
        if not key.startswith(("log_", "__")):
            out[key] = _json_safe(value)
    return out


class _Traceback:
    """A relayed event's ``log_failure``: the traceback text the other process wrote (what
    Twisted's observers and :func:`json_line` ask a failure for)."""

    def __init__(self, text: str) -> None:
        self._text = text

    def getTraceback(self, *args: Any, **kwargs: Any) -> str:
        return self._text


def relayed_event(line: str) -> dict | None:
    """The event a line of :func:`relay_line` carries, or None if it is not one (anything else
    a process wrote to its standard output)."""
    try:
        event = eventFromJSON(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("log_level") not in _ORDER \
            or not isinstance(event.get("log_format"), str):
        return None
    traceback = event.pop("log_traceback", None)
    if isinstance(traceback, str):
        event["log_failure"] = _Traceback(traceback)
    return event


def tag(event: dict, pid: int, process: int) -> dict:
    """Mark ``event`` as one of process number ``process`` (pid ``pid``): the fields ``pid`` and
    ``process``, and both in the ``[system]`` column of a text log line. Fields of those names the
    event has already are kept (they fill its message)."""
    event.setdefault("pid", pid)
    event.setdefault("process", process)
    system = event.get("log_system")
    event["log_circles_system"] = system  # json_line's ``system``: as it was
    if system is None:
        level: Any = event.get("log_level")
        system = f"{event.get('log_namespace') or '-'}#{level.name if level in _ORDER else '-'}"
    event["log_system"] = f"{system} process={process} pid={pid}"
    return event


@implementer(ILogObserver)
class ProcessTags:
    """A log observer that tags every event this process logs (:func:`tag`) before the observers
    added after it write it; events relayed from other processes come tagged already. twistd
    adds its own observers once the plugin's service is made, so one added while making it comes
    first."""

    def __init__(self, process: int) -> None:
        self.process = process

    def __call__(self, event: dict) -> None:
        if "log_circles_system" not in event:
            tag(event, os.getpid(), self.process)

    def start(self) -> None:
        twisted.logger.globalLogPublisher.addObserver(self)
