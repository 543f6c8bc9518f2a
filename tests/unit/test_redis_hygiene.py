"""Redis holds only what it must, and says no clearly: the script size limit (nothing too large
is ever written), the private Redis's maxmemory with noeviction, and a full Redis answered as
such (plays -32004, webhooks 503, /ready 503) until it has room again.

Here the limits and options as computed and parsed; against real redis-servers in
tests/integration/test_redis_hygiene.py."""

from __future__ import annotations

import pytest

from circles import Config
from circles.backend.embedded import (
    MAXMEMORY_BASE,
    MAXMEMORY_CEILING,
    MAXMEMORY_FLOOR,
    TASK_OVERHEAD,
    WEBHOOK_EVENTS,
    derived_maxmemory,
)
from circles.server.config import DEFAULT_MAX_SCRIPT_SIZE
from circles.server_tap import Options, memory_size
from circles.worker.tiny_engine import MAX_SCRIPT
from devtools.redis_server import REDIS_SERVER

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


# -- the script size limit ----------------------------------------------------------------------

def test_the_default_script_limit_is_the_tiny_engines():
    assert DEFAULT_MAX_SCRIPT_SIZE == MAX_SCRIPT == Config().max_script_size == 64 * 1024


def test_the_option_and_its_help(tmp_path):
    options = Options()
    options.parseOptions(["--redis-url", "redis://h:1/0", "--max-script-size", "2048"])
    assert options.config.max_script_size == 2048
    assert "--max-script-size=" in str(options) and "largest script a play may carry" in " ".join(str(options).split())


def test_the_maxmemory_formula():
    mib = 1024 * 1024
    # 10 connections x 2 plays x (1 KiB script + 64 KiB output + overhead): the base dominates, the floor holds.
    small = dict(max_connections=10, max_plays=2, max_script=1024, max_output=64 * 1024)
    assert derived_maxmemory(**small) == MAXMEMORY_FLOOR
    # 500 x 1 x (64 KiB + 64 KiB + 1 KiB) + 32 MiB, between the bounds.
    mid = dict(max_connections=500, max_plays=1, max_script=64 * 1024, max_output=64 * 1024)
    assert derived_maxmemory(**mid) == MAXMEMORY_BASE + 500 * (128 * 1024 + TASK_OVERHEAD)
    assert derived_maxmemory(**mid, processes=2) == MAXMEMORY_BASE + 1000 * (128 * 1024 + TASK_OVERHEAD)
    assert derived_maxmemory(**mid, webhook_body=64 * 1024) == \
        MAXMEMORY_BASE + 500 * (128 * 1024 + TASK_OVERHEAD) + WEBHOOK_EVENTS * (64 * 1024 + TASK_OVERHEAD)
    # A script is never larger than a message: the output cap bounds it too.
    assert derived_maxmemory(max_connections=500, max_plays=1, max_script=10 * mib, max_output=64 * 1024) == \
        derived_maxmemory(**mid)
    # The defaults allow more than a machine has: the ceiling, or a quarter of the memory.
    assert Config().private_redis_maxmemory(physical=64 * 1024 * mib) == MAXMEMORY_CEILING
    assert Config().private_redis_maxmemory(physical=2 * 1024 * mib) == 512 * mib
    assert Config().private_redis_maxmemory(physical=128 * mib) == MAXMEMORY_FLOOR
    assert Config(max_plays=0).private_redis_maxmemory(physical=64 * 1024 * mib) == MAXMEMORY_CEILING
    assert Config(redis_maxmemory=0).private_redis_maxmemory() == 0  # asked for: none


def test_the_redis_maxmemory_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("CIRCLES_REDIS_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path / "s"), "--redis-maxmemory", "256mb"])
    assert options.config.redis_maxmemory == 256 * 1024 * 1024 and not options.maxmemory_ignored
    assert "maxmemory of the private Redis" in " ".join(str(options).split())
    # A Redis of its own is its operator's to size: said at start, not applied.
    with_url = Options()
    with_url.parseOptions(["--redis-url", "redis://h:1/0", "--redis-maxmemory", "1gb"])
    assert with_url.maxmemory_ignored
    assert memory_size("1gb") == 1 << 30 and memory_size("1000") == 1000 and memory_size("2k") == 2000
    for bad in ("1.5gb", "-1", "lots", "1tb"):
        with pytest.raises(ValueError):
            memory_size(bad)
