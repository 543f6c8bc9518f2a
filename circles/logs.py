"""Logging for circles: ``twisted.logger`` with a process-wide level, set once at start-up.

twistd writes every event it is given, debug included, and formatting costs more than the
work being logged on per-message paths. So circles' loggers drop events below the configured
level (``info`` unless ``--log-level`` says otherwise) before anything is formatted.
"""

from __future__ import annotations

import twisted.logger
from twisted.logger import LogLevel

_ORDER = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 4}
LEVEL_NAMES = tuple(level.name for level in _ORDER)
_threshold = _ORDER[LogLevel.info]


def set_level(name: str) -> None:
    """Emit events at ``name`` (debug, info, warn, error, critical) and above from now on."""
    global _threshold
    _threshold = _ORDER[LogLevel.levelWithName(name)]


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


def json_observer():
    """A log observer writing one JSON object per event to stdout, for log shippers:
    ``twistd --logger=circles.logs.json_observer -n circles ...``."""
    import sys

    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout, recordSeparator="")
