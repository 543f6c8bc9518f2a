"""Redis holds only what it must, and says no clearly: the script size limit (nothing too large
is ever written), the private Redis's maxmemory with noeviction, and a full Redis answered as
such (plays -32004, webhooks 503, /ready 503) until it has room again.

(The limits and options as computed and parsed: tests/unit/test_redis_hygiene.py.)"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from circles import CirclesService, Config
from circles.backend.embedded import EmbeddedRedis
from circles.backend.redis import connect
from circles.backend.redis_url import parse_redis_url
from circles.server.providers.secrets import WebhookSecrets
from circles.server_tap import memory_size
from circles.worker.service import Worker
from circles.worker.tiny_engine import MAX_SCRIPT
from devtools.redis_server import REDIS_SERVER, RedisProcess
from devtools.webhook_support import STRIPE_SECRET, encode, post, stripe_event, stripe_headers

from ..play_client import RPCClient, eventually
from .test_play_ws import CIRCLE, serve

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def play(client, script, **params):
    return client.call("play", {"script": script, **params})


@pytest_twisted.ensureDeferred
async def test_a_script_over_the_limit_is_refused_before_anything_is_written(redis_server, start, redis_client):
    """A client sending 1 MiB plays put 1.5 GB into the private Redis in 24 s: each was stored,
    then refused by the worker. Now the server refuses it, and Redis never sees it."""
    service, port = await serve(start, redis_server.url, max_script_size=1000)
    client = await RPCClient.open(port, CIRCLE)
    before = redis_client("DBSIZE")
    refused = await play(client, "x" * 1001)
    assert refused["error"] == {"code": -32006, "data": {"size": 1001, "limit": 1000},
                                "message": "Too many requests: the script is 1001 bytes, over the server's limit "
                                           "of 1000 (--max-script-size)"}
    # UTF-8 bytes, not characters: 501 of "é" are 1002 bytes.
    assert (await play(client, "é" * 501))["error"]["data"] == {"size": 1002, "limit": 1000}
    assert redis_client("DBSIZE") == before and redis_client("KEYS", "circles:task:*") == []
    # At the limit it is queued (a worker counted live that takes no task: it times out).
    redis_client.pretend_worker(CIRCLE)
    assert (await play(client, "é" * 500, timeout=0.2))["error"]["code"] == -32003
    [task] = redis_client("KEYS", "circles:task:*")
    assert redis_client.hgetall(task)["status"] == "expired"
    client.close()


@pytest_twisted.ensureDeferred
async def test_the_default_limit_refuses_what_the_tiny_engine_would(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url)
    client = await RPCClient.open(port, CIRCLE)
    refused = await play(client, "x" * (MAX_SCRIPT + 1))
    assert refused["error"]["code"] == -32006 and refused["error"]["data"] == {"size": MAX_SCRIPT + 1,
                                                                               "limit": MAX_SCRIPT}
    assert redis_client("KEYS", "circles:task:*") == []
    client.close()


# -- the private Redis's maxmemory ----------------------------------------------------------------

async def config_get(address, name: str) -> str:
    factory = connect(address, reactor)
    try:
        connection = await factory.getConnection(peek=True)
        return (await connection.execute_command("CONFIG", "GET", name))[1]
    finally:
        await factory.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_embedded_redis_runs_with_maxmemory_and_noeviction(tmp_path, start):
    config = Config(listen=("tcp:0:interface=127.0.0.1",), state_dir=str(tmp_path / "state"))
    service = start(CirclesService(config, reactor=reactor))
    await eventually(service.script_runner.is_connected)
    address = service.embedded_redis.address
    assert int(await config_get(address, "maxmemory")) == config.private_redis_maxmemory() > 0
    assert await config_get(address, "maxmemory-policy") == "noeviction"


@pytest_twisted.ensureDeferred
async def test_redis_maxmemory_overrides_the_derived_one(tmp_path):
    redis = EmbeddedRedis(str(tmp_path), reactor=reactor, maxmemory=Config(redis_maxmemory=memory_size("96mb"))
                          .private_redis_maxmemory())
    redis.startService()
    try:
        await eventually(lambda: redis._answered)
        assert int(await config_get(redis.address, "maxmemory")) == 96 * 1024 * 1024
        assert await config_get(redis.address, "maxmemory-policy") == "noeviction"
    finally:
        await redis.stopService()


# -- a full Redis -------------------------------------------------------------------------------

def fill(client) -> list:
    """Put Redis well over its maxmemory (4 MiB): 6 MiB written by one script, which Redis lets
    finish once its first write was allowed (a script is atomic). The keys written."""
    keys = [f"filler:{i}" for i in range(96)]
    client("EVAL", "for i, key in ipairs(KEYS) do redis.call('SET', key, string.rep('x', 65536)) end", len(keys),
           *keys)
    with pytest.raises(RuntimeError, match="^OOM command not allowed"):
        client("SET", "one-more", "x")
    return keys


async def ready(port: int):
    reply = await post(port, "/ready", method=b"GET")
    return reply.code, reply.json()


async def stripe(port: int):
    body = encode(stripe_event())
    return await post(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))


@pytest_twisted.ensureDeferred
async def test_a_full_redis_is_said_so_and_recovers_by_itself(tmp_path, start):
    redis = RedisProcess(str(tmp_path), args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    redis.start()
    sync = redis.client()
    try:
        service, port = await serve(start, redis.url, stripe_secrets=WebhookSecrets.of(STRIPE_SECRET))
        worker = start(Worker(parse_redis_url(redis.url), [CIRCLE], lambda script, ctx: f"ran {script}",
                              reactor=reactor))
        await eventually(lambda: worker.registered)  # heartbeated: plays to the circle are queued
        client = await RPCClient.open(port, CIRCLE)
        assert (await play(client, "before"))["result"] == {"output": "ran before"}
        assert (await stripe(port)).code == 200
        assert await ready(port) == (200, {"status": "ready"})

        tasks = set(sync("KEYS", "circles:task:*"))
        filler = fill(sync)
        full = await play(client, "while full")
        assert full["error"]["code"] == -32004
        assert full["error"]["message"] == "Script backend unavailable: Redis is full (maxmemory)"
        assert "Redis is full (maxmemory)" in full["error"]["data"]
        assert service.script_runner.full
        refused = await stripe(port)
        assert refused.code == 503 and refused.header("Retry-After") == "30"
        assert await ready(port) == (503, {"status": "unavailable",
                                           "reason": "script backend unavailable: Redis is full (maxmemory)"})
        # Still full on the health loop's next writes: still refused, without a task written.
        await eventually(lambda: service.script_runner.health.pings >= 3)
        assert (await play(client, "still full"))["error"]["message"].endswith("Redis is full (maxmemory)")
        assert set(sync("KEYS", "circles:task:*")) == tasks  # nothing was queued
        assert (await client.call("whoami"))["result"]["circle"] == CIRCLE  # the rest is served

        sync("DEL", *filler)
        await eventually(lambda: not service.script_runner.full)  # the health loop's write was taken
        assert await ready(port) == (200, {"status": "ready"})
        assert (await play(client, "after"))["result"] == {"output": "ran after"}
        assert (await stripe(port)).code == 200
        client.close()
    finally:
        sync.close()
        redis.kill()
