"""Who may play: a circle's policy (open or members) and its members, kept in Redis, checked at
each play, managed with `circles members ...`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import Clock

from circles import Config
from circles.backend import members
from circles.backend.embedded import EmbeddedRedis
from circles.backend.redis import connect
from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import BackendUnavailable
from circles.server.gateway import Gateway
from circles.server.providers.secrets import WebhookSecrets
from circles.worker.service import Worker
from devtools.redis_server import REDIS_SERVER, free_port
from devtools.webhook_support import STRIPE_SECRET, encode, post, stripe_event, stripe_headers

from ..inmemory import fired, open_session
from ..play_client import RPCClient, eventually, new_key, pk
from .test_play_ws import CIRCLE, serve

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

CIRCLES = str(Path(sys.executable).with_name("circles"))


def circles_members(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`circles members ...` as a user runs it, in a process of its own."""
    environ = {k: v for k, v in os.environ.items() if k not in ("CIRCLES_REDIS_URL", "REDIS_URL")}
    environ.update(env or {})
    return subprocess.run([CIRCLES, "members", *args], capture_output=True, text=True, env=environ, cwd=cwd,
                          timeout=60)


def run_cli(*args, **kw):
    """The same, off the reactor thread: the servers in the test keep serving meanwhile."""
    return threads.deferToThread(circles_members, *args, **kw)


def play(client, script):
    return client.call("play", {"script": script})


@pytest_twisted.ensureDeferred
async def test_a_members_circle_admits_its_members_from_the_next_play(redis_server, start, tmp_path):
    service, port = await serve(start, redis_server.url, stripe_secrets=WebhookSecrets.of(STRIPE_SECRET))
    worker = start(Worker(parse_redis_url(redis_server.url), [CIRCLE],
                          lambda script, ctx: f"{ctx.caller[:6]} ran {script}", reactor=reactor))
    await eventually(lambda: worker.registered)  # heartbeated: plays to the circle are queued
    member_key, other_key = new_key(), new_key()
    member_client, other_client = await RPCClient.open(port, CIRCLE), await RPCClient.open(port, CIRCLE)
    anonymous = await RPCClient.open(port, CIRCLE)
    member, other = await member_client.authenticate(member_key), await other_client.authenticate(other_key)
    url = ["--redis-url", redis_server.url]

    # Open (the default): any key plays, anonymous callers too (no --auth here).
    assert (await play(member_client, "a"))["result"] == {"output": f"{member[:6]} ran a"}
    assert (await play(other_client, "b"))["result"] == {"output": f"{other[:6]} ran b"}

    # The operator admits members only, and makes one key a member (given uncompressed: normalised).
    uncompressed = member_key.public_key.format(compressed=False).hex()
    added = await run_cli("add", CIRCLE, uncompressed, *url)
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"{member}: added to the members of {CIRCLE}\n"
    assert "is open (any key may play)" in added.stderr
    closed = await run_cli("policy", CIRCLE, "members", *url)
    assert (closed.returncode, closed.stdout) == (0, f"{CIRCLE}: members: only its 1 member may play\n")

    assert (await play(member_client, "c"))["result"] == {"output": f"{member[:6]} ran c"}
    refused = await play(other_client, "d")
    assert refused["error"] == {"code": -32009, "message": "Not a member of this circle",
                                "data": "this circle admits its members only, and the authenticated key is not one"}
    assert (await play(anonymous, "e"))["error"]["data"] == \
        "this circle admits its members only: authenticate with a member's key"
    # Webhook events are the provider's, not a member's: not subject to the policy.
    body = encode(stripe_event())
    assert (await post(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))).code == 200

    # Removed: refused from the next play, on the same connection.
    removed = await run_cli("remove", CIRCLE, member, *url)
    assert (removed.returncode, removed.stdout) == (0, f"{member}: removed from the members of {CIRCLE}\n")
    assert (await play(member_client, "f"))["error"]["code"] == -32009
    listed = await run_cli("list", CIRCLE, "--json", *url)
    assert json.loads(listed.stdout) == {"circle": CIRCLE, "policy": "members", "members": []}

    # Open again: everyone plays.
    opened = await run_cli("policy", CIRCLE, "open", *url)
    assert (opened.returncode, opened.stdout) == (0, f"{CIRCLE}: open: any key may play\n")
    assert (await play(member_client, "g"))["result"] == {"output": f"{member[:6]} ran g"}
    assert (await play(other_client, "h"))["result"] == {"output": f"{other[:6]} ran h"}
    for client in (member_client, other_client, anonymous):
        client.close()


@pytest_twisted.ensureDeferred
async def test_the_keys_and_the_cli_output(redis_server, redis_client):
    circle, key, second = pk(new_key()), pk(new_key()), pk(new_key())
    env = {"CIRCLES_REDIS_URL": redis_server.url}  # found as the worker finds it
    assert (await run_cli("policy", circle, env=env)).stdout == f"{circle}: open: any key may play\n"
    assert (await run_cli("add", circle, key, env=env)).returncode == 0
    again = await run_cli("add", circle, key, "--json", env=env)
    assert json.loads(again.stdout) == {"circle": circle, "key": key, "changed": False, "policy": "open"}
    await run_cli("add", circle, second, env=env)
    await run_cli("policy", circle, "members", env=env)
    # The keys the design names, with no TTL.
    assert redis_client("GET", f"circles:policy:{circle}") == "members"
    assert sorted(redis_client("SMEMBERS", f"circles:members:{circle}")) == sorted([key, second])
    assert redis_client("TTL", f"circles:policy:{circle}") == -1
    assert redis_client("TTL", f"circles:members:{circle}") == -1
    assert (await run_cli("list", circle, env=env)).stdout == "".join(f"{k}\n" for k in sorted([key, second]))
    assert json.loads((await run_cli("policy", circle, "--json", env=env)).stdout) == {"circle": circle,
                                                                                     "policy": "members"}
    # open is the default: its key is removed, not written.
    await run_cli("policy", circle, "open", env=env)
    assert redis_client("EXISTS", f"circles:policy:{circle}") == 0
    # Another prefix, as the servers' --redis-prefix.
    await run_cli("add", circle, key, "--redis-prefix", "other:", env=env)
    assert redis_client("SMEMBERS", f"other:members:{circle}") == [key]


@pytest_twisted.ensureDeferred
async def test_cli_mistakes_and_an_unreachable_redis(tmp_path):
    circle, key = pk(new_key()), pk(new_key())
    for args, message in [
        (("add", circle), "members add needs the member's KEY"),
        (("add", "nothex", key), "CIRCLE: public key is not hex"),
        (("remove", circle, "02" + "00" * 32), "KEY: public key is not a point on secp256k1"),
        (("policy", circle, "closed"), "unknown policy 'closed': open or members"),
        (("list", circle, key), "members list takes the CIRCLE only"),
        (("add", circle, key, "--redis-url", "http://h"), "--redis-url: unsupported scheme"),
    ]:
        result = await run_cli(*args, cwd=str(tmp_path))
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    usage = await run_cli("delete", circle, cwd=str(tmp_path))
    assert usage.returncode == 2 and "invalid choice: 'delete'" in usage.stderr
    nobody = await run_cli("list", circle, "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--connect-timeout",
                           "0.5", cwd=str(tmp_path))
    assert nobody.returncode == 3
    assert "cannot reach Redis at redis://127.0.0.1:" in nobody.stderr and "Traceback" not in nobody.stderr
    # No URL anywhere: the private Redis of --state-dir, and what to check when none runs there.
    private = await run_cli("list", circle, "--connect-timeout", "0.5", cwd=str(tmp_path))
    assert private.returncode == 3
    assert f"is a circles server running with --state-dir {tmp_path}/circles-state?" in private.stderr


@pytest_twisted.ensureDeferred
async def test_the_cli_finds_a_servers_private_redis(tmp_path):
    redis = EmbeddedRedis(str(tmp_path / "state"), reactor=reactor)
    redis.startService()
    factory = connect(redis.address, reactor)
    try:
        connection = await factory.getConnection(peek=True)
        circle, key = pk(new_key()), pk(new_key())
        added = await run_cli("add", circle, key, "--state-dir", str(tmp_path / "state"))
        assert added.returncode == 0, added.stderr
        assert await members.members(connection, "circles:", circle) == [key]
    finally:
        await factory.disconnect()
        await redis.stopService()


@pytest_twisted.ensureDeferred
async def test_an_unknown_policy_refuses_every_play(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url)
    client = await RPCClient.open(port, CIRCLE)
    key = await client.authenticate(new_key())
    redis_client("SET", f"circles:policy:{CIRCLE}", "member")  # a typo, by hand: not a way in
    redis_client("SADD", f"circles:members:{CIRCLE}", key)
    refused = await play(client, "x")
    assert refused["error"]["code"] == -32009 and "neither open nor members" in refused["error"]["data"]
    assert service.membership.unknown == 1
    client.close()


@pytest_twisted.ensureDeferred
async def test_redis_unreachable_while_checking_is_32004(redis_server, start, redis_client):
    service, port = await serve(start, redis_server.url)
    redis_client("SET", f"circles:policy:{CIRCLE}", "members")
    client = await RPCClient.open(port, CIRCLE)
    assert (await play(client, "x"))["error"]["code"] == -32009
    redis_server.kill()
    assert (await play(client, "x"))["error"]["code"] == -32004
    # The check itself, Redis gone: unavailable at once, not a verdict.
    await eventually(lambda: service.membership._redis.size == 0)
    with pytest.raises(BackendUnavailable):
        await service.membership.check(CIRCLE, "")
    client.close()


@pytest_twisted.ensureDeferred
async def test_the_check_is_one_read_only_script(redis_server, redis_client):
    """One round trip, and answered by a Redis at its maxmemory (it writes nothing)."""
    factory = connect(parse_redis_url(redis_server.url), reactor)
    try:
        connection = await factory.getConnection(peek=True)
        circle, key = pk(new_key()), pk(new_key())
        await members.set_policy(connection, "circles:", circle, "members")
        await members.add(connection, "circles:", circle, key)
        redis_client("CONFIG", "SET", "maxmemory", "1")  # over it: every write refused
        try:
            with pytest.raises(Exception, match="OOM"):
                await members.add(connection, "circles:", circle, pk(new_key()))
            assert await members.may_play(connection, "circles:", circle, key) == members.Verdict(True, "members")
            assert await members.may_play(connection, "circles:", circle, "") == members.Verdict(False, "members")
            assert await members.may_play(connection, "circles:", pk(new_key()), "") == members.Verdict(True, "open")
        finally:
            redis_client("CONFIG", "SET", "maxmemory", "0")
    finally:
        await factory.disconnect()


def test_without_redis_every_circle_is_open():
    """An in-memory script runner (tests, embedding): no policies, anyone plays."""
    from twisted.internet.defer import succeed
    from zope.interface import implementer

    from circles.backend.scripts import IScriptRunner

    @implementer(IScriptRunner)
    class Runner:
        def run(self, request):
            return succeed(f"ran {request.script}")

        def is_connected(self):
            return True

    gateway = Gateway(Config(rate_limit=0), Clock(), Runner())
    assert gateway.members is None
    session = open_session(gateway, CIRCLE, connection_id=1)
    reply = session.answer(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "play", "params": {"script": "x"}}))
    assert json.loads(fired(reply))["result"] == {"output": "ran x"}


@pytest_twisted.ensureDeferred
async def test_the_earlier_contracts_answer_32009_too(redis_server, start, redis_client):
    """The circles-era and hero contracts keep the gateway's meaning of the codes the original
    does not name: -32009 is the same on every contract."""
    service, port = await serve(start, redis_server.url, api="circles")
    redis_client("SET", f"circles:policy:{CIRCLE}", "members")
    client = await RPCClient.open(port, CIRCLE)
    refused = await play(client, "x")
    assert (refused["error"]["code"], refused["error"]["message"]) == (-32009, "Not a member of this circle")
    document = (await client.call("rpc.discover"))["result"]
    assert document["components"]["errors"]["NotAMember"]["code"] == -32009
    assert "-32009 not a member of this circle" in document["info"]["description"]
    client.close()


@pytest_twisted.ensureDeferred
async def test_authenticate_answers_as_before_and_the_debug_log_says_who_may_play(redis_server, start, redis_client):
    from twisted.logger import formatEvent

    from circles.common import logs

    from ..inmemory import captured_log

    service, port = await serve(start, redis_server.url)
    redis_client("SET", f"circles:policy:{CIRCLE}", "members")
    member_key, other_key = new_key(), new_key()
    redis_client("SADD", f"circles:members:{CIRCLE}", pk(member_key))
    logs.set_level("debug")
    try:
        with captured_log() as events:
            clients = [await RPCClient.open(port, CIRCLE) for _ in range(2)]
            for client, key in zip(clients, (member_key, other_key)):
                await client.authenticate(key)  # asserts {authenticated: true}: not refused

            def noted():
                lines = [formatEvent(e) for e in events if "play on circle" in formatEvent(e)]
                return lines if len(lines) == 2 else None
            lines = await eventually(noted)
    finally:
        logs.set_level("info")
    assert any(f"{pk(member_key)} may play on circle {CIRCLE} (policy members)" in line for line in lines)
    assert any(f"{pk(other_key)} may not play on circle {CIRCLE} (policy members)" in line for line in lines)
    for client in clients:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_check_waits_for_its_connection_within_its_timeout(redis_server):
    """The membership connection may come up a moment after the script runner's: a check then
    waits for it (one wait for all), and gives up at CHECK_TIMEOUT on the reactor's clock."""
    clock = Clock()
    membership = members.Membership(parse_redis_url(redis_server.url), reactor=reactor, prefix="circles:")
    membership.startService()
    try:
        circle = pk(new_key())
        first, second = membership.check(circle, ""), membership.check(circle, "")  # before it is connected
        assert membership._redis.size == 0
        assert await first == await second == members.Verdict(True, "open")
    finally:
        await membership.stopService()
    # A Redis that never answers: refused once the check's time is up, by the clock it was given.
    port = free_port()
    membership = members.Membership(parse_redis_url(f"redis://127.0.0.1:{port}/0"), reactor=reactor,
                                     prefix="circles:")
    membership.startService()
    membership.reactor = clock  # timers from here on: advanced by hand
    try:
        checked = membership.check(pk(new_key()), "")
        assert not checked.called
        clock.advance(members.CHECK_TIMEOUT)
        with pytest.raises(BackendUnavailable, match="did not answer within 5s"):
            await checked
    finally:
        await membership.stopService()


@pytest_twisted.ensureDeferred
async def test_the_cli_says_when_redis_refuses_its_password(tmp_path):
    from devtools.redis_server import RedisProcess

    redis = RedisProcess(str(tmp_path), args=["--requirepass", "right"])
    redis.start_with_password("right")
    try:
        circle, key = pk(new_key()), pk(new_key())
        wrong = await run_cli("add", circle, key, "--redis-url", f"redis://:wrong@127.0.0.1:{redis.port}/0",
                              "--connect-timeout", "5", cwd=str(tmp_path))
        assert wrong.returncode == 3 and "refused the connection" in wrong.stderr, wrong.stderr
        assert "wrong" not in wrong.stderr  # never the password
        right = await run_cli("add", circle, key, "--redis-url", f"redis://:right@127.0.0.1:{redis.port}/0",
                              cwd=str(tmp_path))
        assert right.returncode == 0, right.stderr
    finally:
        redis.kill()
