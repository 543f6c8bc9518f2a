"""What the two twistd plugins (``circles`` and ``circles-worker``) share: option value
converters and the options naming the Redis that servers and workers meet in.

Only the backend's modules are imported here, so the worker's options load nothing of the
gateway.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from circles.backend import tasks
from circles.backend.embedded import DEFAULT_STATE_DIR, SOCKET_NAME
from circles.backend.redis import RedisAddress

#: Where ``--redis-url`` is read from when not given.
REDIS_URL_ENV = "CIRCLES_REDIS_URL"


def positive(kind: Callable) -> Callable[[str], object]:
    """A converter of ``kind`` (int, float) refusing zero and below."""
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise ValueError(f"{text} is not positive")
        return value
    convert.__name__ = kind.__name__  # usage.Options names the type in its error message
    return convert


def at_least_zero(kind: Callable) -> Callable[[str], object]:
    """A converter for limits where 0 means "no limit" (or "off")."""
    def convert(text: str):
        value = kind(text)
        if value < 0:
            raise ValueError(f"{text} is negative")
        return value
    convert.__name__ = kind.__name__
    return convert


def redis_parameters(url_help: str, otherwise: str, state_dir_help: str) -> list:
    """``--redis-url``, ``--redis-prefix`` and ``--state-dir``, the same for both plugins but
    for what they say of where the Redis is (``otherwise``: without a URL)."""
    return [
        ("redis-url", None, None, f"{url_help} (default: ${REDIS_URL_ENV}, else {otherwise})"),
        ("redis-prefix", None, tasks.DEFAULT_PREFIX, "prefix of every Redis key (servers and workers must agree)"),
        ("state-dir", None, DEFAULT_STATE_DIR, state_dir_help),
    ]


def redis_url(option: Optional[str]) -> Optional[str]:
    """``--redis-url`` as given, else ``$CIRCLES_REDIS_URL``, else None (the private Redis)."""
    return option or os.environ.get(REDIS_URL_ENV) or None


def private_redis_address(state_dir: str) -> RedisAddress:
    """The socket of the private Redis a server keeps in ``state_dir``."""
    return RedisAddress(path=os.path.join(os.path.abspath(state_dir), SOCKET_NAME))

