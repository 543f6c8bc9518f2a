"""The options naming the Redis that servers and workers meet in (``--redis-url``,
``--redis-url-file``, ``--redis-prefix``, ``--state-dir`` and their variables), the same for
both twistd plugins and the ``circles`` command, and how they become an address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.python import usage

from circles.backend import tasks
from circles.backend.embedded import DEFAULT_STATE_DIR, SOCKET_NAME
from circles.backend.redis_url import InvalidRedisURL, RedisAddress, parse_redis_url, redact_url
from circles.common.options import DOTENV, SecretFileError, describe_source, from_environment, read_secret_file

#: Where ``--redis-url`` is read from when not given: the URL, or the path of a file holding it.
REDIS_URL_ENV = "CIRCLES_REDIS_URL"
REDIS_URL_FILE_ENV = "CIRCLES_REDIS_URL_FILE"
ORIGINAL_REDIS_URL_ENV = "REDIS_URL"  # the Rust circles server's name; ours wins when both are set


def redis_parameters(url_help: str, otherwise: str, state_dir_help: str) -> list:
    """``--redis-url``, ``--redis-url-file``, ``--redis-prefix`` and ``--state-dir``, the same for
    both plugins but for what they say of where the Redis is (``otherwise``: without a URL)."""
    return [
        ("redis-url", None, None, f"{url_help} (default: ${REDIS_URL_ENV}, else the file ${REDIS_URL_FILE_ENV} "
                                  f"names, else ${ORIGINAL_REDIS_URL_ENV}, from the environment or ./{DOTENV}; "
                                  f"else {otherwise}). "
                                  f"A URL with a password belongs in the environment or a file, not here: the "
                                  f"command line is visible to every user of the machine"),
        ("redis-url-file", None, None, f"file holding the Redis URL (one line, with its password; readable by "
                                       f"the service alone), instead of --redis-url (in the environment: "
                                       f"${REDIS_URL_FILE_ENV})"),
        ("redis-prefix", None, tasks.DEFAULT_PREFIX, "prefix of every Redis key (servers and workers must agree)"),
        ("state-dir", None, DEFAULT_STATE_DIR, state_dir_help),
    ]


def private_redis_address(state_dir: str) -> RedisAddress:
    """The socket of the private Redis a server keeps in ``state_dir``."""
    return RedisAddress(path=os.path.join(os.path.abspath(state_dir), SOCKET_NAME))


@attrs.frozen
class RedisChoice:
    """The Redis the options of :func:`redis_parameters` name."""

    url: str | None = attrs.field(repr=lambda url: repr(redact_url(url)))  # None: the private Redis
    address: RedisAddress  # the URL's, or the private Redis's socket in the state directory
    source: str = "--state-dir"  # where the URL came from: --redis-url(-file), $CIRCLES_REDIS_URL(_FILE), $REDIS_URL
    ignored: tuple[str, ...] = ()  # variables also set that the source overrides

    def log_line(self) -> str:
        """Which source named the Redis (never the URL: it may carry a password)."""
        if self.private:
            return ("Redis: the private redis-server in --state-dir (no --redis-url, --redis-url-file, "
                    "$CIRCLES_REDIS_URL, $CIRCLES_REDIS_URL_FILE, $REDIS_URL)")
        return describe_source("Redis URL", self.source, self.ignored)

    @property
    def private(self) -> bool:
        return self.url is None


def choose_redis(options: Mapping[str, str | None], reactor: Any,
                 dotenv: tuple[str, Mapping[str, str]] | None = None) -> RedisChoice:
    """The Redis that parsed ``options`` name: ``--redis-url`` or the file ``--redis-url-file``
    names (else ``$CIRCLES_REDIS_URL``, else the file ``$CIRCLES_REDIS_URL_FILE`` names, else
    ``$REDIS_URL``, the Rust server's name; then the same three in ``dotenv``), else the private
    one in ``--state-dir``; checked as far as it can be without connecting.

    A URL that is not one is a usage mistake: :class:`usage.UsageError`. A ``rediss://`` URL
    whose ``ssl_ca_certs`` file cannot be used raises :class:`InvalidRedisURL`, which each plugin
    answers its own way (the server with one line and no help text, the worker as a usage
    mistake).
    """
    names = (REDIS_URL_ENV, REDIS_URL_FILE_ENV, ORIGINAL_REDIS_URL_ENV)
    given = [option for option in ("redis-url", "redis-url-file") if options.get(option)]
    if len(given) == 2:
        raise usage.UsageError("give --redis-url or --redis-url-file, not both")
    path = None
    if given:
        source: str | None = f"--{given[0]}"
        url = options["redis-url"]
        path = options.get("redis-url-file")
        _, first, rest = from_environment(names, dotenv=dotenv)
        ignored = ((first,) + rest) if first else ()
    else:
        url, source, ignored = from_environment(names, dotenv=dotenv)
        if source is not None and REDIS_URL_FILE_ENV in source:
            path, url = url, None
    if path is not None:
        try:
            url = read_secret_file(path).strip()
        except SecretFileError as e:
            raise SystemExit(f"circles: {source}: {e}") from None
        if not url or "\n" in url:
            raise SystemExit(f"circles: {source}: {path} must hold one line, the Redis URL")
    if not url:
        return RedisChoice(None, private_redis_address(options["state-dir"]))  # type: ignore[arg-type]  # a default
    try:
        address = parse_redis_url(url)
    except InvalidRedisURL as e:
        raise usage.UsageError(f"--redis-url: {e}" if source == "--redis-url" else f"--redis-url (from {source}): {e}") from None
    if not address.sentinels:
        address.endpoint(reactor)  # reads an ssl_ca_certs file: a bad one stops start-up
    return RedisChoice(url, address, source, ignored)  # type: ignore[arg-type]  # a URL comes with its source
