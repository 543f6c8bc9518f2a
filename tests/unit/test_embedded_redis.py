"""The private redis-server started when no --redis-url is given: what is refused before any
starts (the running ones and the plugins' start-up: tests/integration/test_embedded_redis.py)."""

from __future__ import annotations

import os

import pytest
from twisted.internet import reactor
from twisted.python import usage

from circles import server_tap
from circles.backend.embedded import EmbeddedRedis, EmbeddedRedisError
from devtools.redis_server import REDIS_SERVER

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def test_a_temporary_state_dir_someone_else_made_is_refused(tmp_path):
    redis = EmbeddedRedis(None, reactor=reactor)
    os.mkdir(redis.state_dir)
    try:
        with pytest.raises(EmbeddedRedisError, match="cannot make the private directory"):
            redis.startService()
    finally:
        os.rmdir(redis.state_dir)


def test_missing_binary_is_one_clear_error(tmp_path):
    with pytest.raises(EmbeddedRedisError, match="not found on PATH"):
        EmbeddedRedis(str(tmp_path), reactor=reactor, binary="no-such-redis-server").startService()


def test_server_options_without_redis_server_on_path(monkeypatch):
    monkeypatch.delenv("CIRCLES_REDIS_URL", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit, match="redis-server not found on PATH"):
        server_tap.Options().parseOptions([])
    # with a Redis URL the binary is not needed
    options = server_tap.Options()
    options.parseOptions(["--redis-url", "redis://:pw@h:1/2"])
    assert options.config.redis_url == "redis://:pw@h:1/2"


def test_server_options(monkeypatch, tmp_path):
    monkeypatch.delenv("CIRCLES_REDIS_URL", raising=False)
    options = server_tap.Options()
    options.parseOptions(["--script-timeout", "5", "--redis-prefix", "x:", "--state-dir", str(tmp_path),
                          "--redis-persist"])
    config = options.config
    assert (config.script_timeout, config.redis_prefix, config.state_dir, config.redis_url, config.redis_persist) \
        == (5.0, "x:", str(tmp_path), None, True)
    monkeypatch.setenv("CIRCLES_REDIS_URL", "redis://h:1/0")
    options = server_tap.Options()
    options.parseOptions([])
    assert options.config.redis_url == "redis://h:1/0"
    for argv in (["--redis-url", "http://h"], ["--script-timeout", "0"]):
        with pytest.raises(usage.UsageError):
            server_tap.Options().parseOptions(argv)
