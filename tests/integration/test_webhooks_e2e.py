"""Webhooks end to end: signed delivery -> CirclesService -> real Redis -> reference worker.

Also through the real processes (``twistd -n circles`` and ``twistd -n circles-worker``), and a
hypothesis round trip proving that whatever strings an event carries reach the worker's engine
byte for byte, in the task's data and never in the script.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, threads
from twisted.internet.defer import ensureDeferred, gatherResults, maybeDeferred

from circles import CirclesService, Config, webhooks
from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import SOURCE_IDENFY, SOURCE_STRIPE
from circles.server.providers.secrets import IDENFY_ENV, STRIPE_ENV, WebhookSecrets
from circles.worker.engines import ExecEngine
from circles.worker.service import Worker
from devtools.twistd import TWISTD
from devtools.webhook_support import (
    IDENFY_SECRET,
    STRIPE_SECRET,
    encode,
    idenfy_callback,
    idenfy_headers,
    post,
    post_sync,
    stripe_event,
    stripe_headers,
)

from ..play_client import eventually, new_key, pk
from ..support import twistd

CIRCLE = pk(new_key())
NASTY = ['"', "'", "\\", "\\\\\"", "${CIRCLES_DATA}", "${x}", "`id`", "$(id)", "\n", "\r\n", "\u2028", "\x00",
         "\ud800", "\udfff", "\U0001f600", "é", "*/ /*", "// ", "\")\nprint(\"pwned\");//", "%s", "{{x}}"]


class Stack:
    """A CirclesService on real Redis and an in-process worker whose engine records each call."""

    def __init__(self, redis_server, **config) -> None:
        self.redis_server = redis_server
        self.calls: dict = {}

        def engine(script, context):
            self.calls[context.task_id] = (script, context)
            return "handled"

        config.setdefault("stripe_secrets", WebhookSecrets.of(STRIPE_SECRET))
        config.setdefault("idenfy_secrets", WebhookSecrets.of(IDENFY_SECRET))
        self.service = CirclesService(Config(listen=("tcp:0:interface=127.0.0.1",), circles=[CIRCLE],
                                             redis_url=redis_server.url, **config), reactor=reactor)
        self.worker = Worker(parse_redis_url(redis_server.url), [CIRCLE], engine, reactor=reactor, concurrency=8)
        self.port = 0

    async def start(self, worker: bool = True) -> Stack:
        self.service.startService()
        [port] = await self.service.when_listening()
        self.port = port.getHost().port
        await eventually(self.service.script_runner.is_connected)
        if worker:
            self.worker.startService()
        return self

    async def stop(self) -> None:
        for service in (self.worker, self.service):
            if service.running:
                await maybeDeferred(service.stopService)

    def stripe(self, body: bytes):
        return post(self.port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))

    def idenfy(self, body: bytes):
        return post(self.port, f"/webhooks/idenfy/{CIRCLE}", body, idenfy_headers(body))

    async def handled(self, task_id: str):
        """``(script, context)`` of the engine call for ``task_id``, once the worker ran it."""
        return await eventually(lambda: self.calls.get(task_id), timeout=60)


@pytest_twisted.async_yield_fixture
async def stack(redis_server):
    started = []

    async def make(worker: bool = True, **config) -> Stack:
        started.append(Stack(redis_server, **config))
        return await started[-1].start(worker)

    yield make
    for s in started:
        await s.stop()


@pytest_twisted.ensureDeferred
async def test_stripe_and_idenfy_events_reach_the_worker(stack, redis_client):
    s = await stack()
    body = encode(stripe_event("evt_e2e"))
    reply = await s.stripe(body)
    assert reply.code == 200, reply
    task_id = reply.json()["task_id"]
    script, context = await s.handled(task_id)
    assert script == webhooks.STRIPE_SCRIPT
    assert context.data.encode("utf-8") == body
    assert (context.circle, context.caller, context.source) == (CIRCLE, "", SOURCE_STRIPE)
    task = await eventually(lambda: (t := redis_client.hgetall(f"circles:task:{task_id}"))
                            .get("status") == "completed" and t)
    # Nobody waits for the result: once finished, the hash keeps its status fields, for seconds.
    assert task["reply_to"] == "" and not {"script", "data", "output"} & set(task)

    body = encode(idenfy_callback("scan-e2e"))
    reply = await s.idenfy(body)
    script, context = await s.handled(reply.json()["task_id"])
    assert script == webhooks.IDENFY_SCRIPT and context.source == SOURCE_IDENFY
    assert json.loads(context.data) == json.loads(body)


@pytest_twisted.ensureDeferred
async def test_duplicate_is_queued_once_and_remembered_with_a_ttl(stack, redis_client):
    s = await stack(worker=False, webhook_dedupe_ttl=1000)
    body = encode(stripe_event("evt_once"))
    first, second = await s.stripe(body), await s.stripe(body)
    assert first.code == second.code == 200
    assert second.json() == {"received": True, "task_id": first.json()["task_id"], "duplicate": True}
    assert redis_client("KEYS", "circles:task:*") == [f"circles:task:{first.json()['task_id']}"]
    assert redis_client("LRANGE", f"circles:queue:{CIRCLE}", 0, -1) == [first.json()["task_id"]]
    [seen] = redis_client("KEYS", "circles:seen:*")
    assert 990 <= redis_client("TTL", seen) <= 1000
    # The queued event waits for a worker as long as --webhook-deadline says, plus the task TTL.
    task_ttl = redis_client("TTL", f"circles:task:{first.json()['task_id']}")
    assert task_ttl > Config().webhook_deadline
    # A play queued meanwhile must not shorten the queue's life.
    redis_client.pretend_worker(CIRCLE)
    await s.service.script_runner.run(tasks_request(timeout=0.2)).addErrback(lambda f: None)
    assert redis_client("TTL", f"circles:queue:{CIRCLE}") > Config().webhook_deadline


@pytest_twisted.ensureDeferred
async def test_a_replayed_idenfy_callback_is_not_run_again_after_a_server_restart(stack, redis_client):
    """iDenfy's dedupe key is in Redis with a TTL, as Stripe's (not in the server's memory): a
    new server process on the same Redis knows the callback."""
    first = await stack(webhook_dedupe_ttl=1000)
    body = encode(idenfy_callback("scan-restart"))
    reply = await first.idenfy(body)
    assert reply.code == 200 and "duplicate" not in reply.json()
    await first.handled(reply.json()["task_id"])
    [seen] = redis_client("KEYS", "circles:seen:idenfy:*")
    assert redis_client("GET", seen) == reply.json()["task_id"] and 990 <= redis_client("TTL", seen) <= 1000
    await first.stop()
    second = await stack(webhook_dedupe_ttl=1000)  # a new server and worker, the same Redis
    replayed = await second.idenfy(body)
    assert replayed.code == 200 and replayed.json() == {"received": True, "task_id": reply.json()["task_id"],
                                                        "duplicate": True}
    assert redis_client("LLEN", f"circles:queue:{CIRCLE}") == 0 and second.calls == {}
    # Another callback for the same scan (its final result) is a new event.
    other = await second.idenfy(encode(idenfy_callback("scan-restart", overall="DENIED")))
    assert other.code == 200 and "duplicate" not in other.json()
    await second.handled(other.json()["task_id"])


def tasks_request(timeout: float):
    from circles.backend.scripts import ScriptRequest
    return ScriptRequest(circle=CIRCLE, script="x", caller="", source="ws", timeout=timeout)


@pytest_twisted.ensureDeferred
async def test_concurrent_duplicates_queue_one_task(stack, redis_client):
    s = await stack(worker=False)
    body = encode(stripe_event("evt_race"))
    replies = await gatherResults([ensureDeferred(s.stripe(body)) for _ in range(20)])
    assert {r.code for r in replies} == {200}
    assert len({r.json()["task_id"] for r in replies}) == 1
    assert sum(1 for r in replies if not r.json().get("duplicate")) == 1
    assert redis_client("LLEN", f"circles:queue:{CIRCLE}") == 1


@pytest_twisted.ensureDeferred
async def test_redis_down_is_503_and_nothing_is_remembered(stack, redis_server, redis_client):
    s = await stack(worker=False)
    redis_server.kill()
    await eventually(lambda: not s.service.script_runner.is_connected())
    body = encode(stripe_event("evt_while_down"))
    reply = await s.stripe(body)
    assert reply.code == 503 and reply.json() == {"error": "backend unavailable, retry later"}
    redis_server.start()
    await eventually(s.service.script_runner.is_connected)
    client = redis_server.client()
    try:
        assert client("KEYS", "*") == []
        # The provider's retry is queued: the failed attempt left no "seen" mark.
        reply = await s.stripe(body)
        assert reply.code == 200 and "duplicate" not in reply.json()
        assert client("LLEN", f"circles:queue:{CIRCLE}") == 1
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_exec_worker_gets_the_event_in_env_and_file(redis_server, redis_client, stack):
    script = 'printf "%s" "$CIRCLES_SOURCE|$CALLER_ID|"; cat "$CIRCLES_DATA_FILE"; printf "|%s" "${CIRCLES_DATA-absent}"\n'
    s = await stack(worker=False, stripe_script=script)
    sh = ExecEngine("sh {script_file}", reactor=reactor)
    outputs = {}

    def engine(script, context):  # the exec engine, its output noted (the task keeps none once finished)
        return sh(script, context).addCallback(lambda output: outputs.setdefault(context.task_id, output))

    worker = Worker(parse_redis_url(redis_server.url), [CIRCLE], engine, reactor=reactor)
    worker.startService()
    try:
        small = encode(stripe_event("evt_small", note="it's \"quoted\" ${HOME} \\ `x`\n"))
        large = encode(stripe_event("evt_large", blob="z" * 200_000))  # over what an environment allows

        async def output(body):
            task_id = (await s.stripe(body)).json()["task_id"]
            task = await eventually(lambda: (t := redis_client.hgetall(f"circles:task:{task_id}"))
                                    .get("status") in ("completed", "error") and t, timeout=60)
            assert task["status"] == "completed", task
            return outputs[task_id]

        assert await output(small) == f"webhook:stripe||{small.decode()}|{small.decode()}"
        assert await output(large) == f"webhook:stripe||{large.decode()}|absent"
    finally:
        await worker.stopService()


# -- hypothesis: arbitrary strings, byte for byte ------------------------------------------------

strings = st.one_of(st.text(st.characters(exclude_categories=()), max_size=40), st.sampled_from(NASTY),
                    st.lists(st.sampled_from(NASTY), max_size=6).map("".join))


def in_reactor(coroutine_function, *args):
    """From the hypothesis thread: run an async step in the reactor and wait for its result."""
    return threads.blockingCallFromThread(reactor, lambda: ensureDeferred(coroutine_function(*args)))


@settings(max_examples=60, deadline=None)
@given(event_id=strings, event_type=strings, metadata=st.dictionaries(strings, strings, max_size=5),
       ascii_only=st.booleans())
def arbitrary_strings_round_trip(s: Stack, event_id, event_type, metadata, ascii_only) -> None:
    event = stripe_event(f"evt_{uuid.uuid4().hex}{event_id}", type=event_type or "x")
    event["data"]["object"]["metadata"] = metadata
    try:
        body = json.dumps(event, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates exist in JSON only as \u escapes
        body = json.dumps(event).encode("utf-8")
    reply = in_reactor(s.stripe, body)
    assert reply.code == 200, reply
    script, context = in_reactor(s.handled, reply.json()["task_id"])
    assert script == webhooks.STRIPE_SCRIPT  # nothing of the event in the script
    assert context.data.encode("utf-8") == body
    # JSON's own reading (an escaped surrogate pair is one character), field by field.
    assert json.loads(context.data) == json.loads(body)


@pytest_twisted.ensureDeferred
async def test_arbitrary_strings_reach_the_worker_byte_identical(stack):
    s = await stack()
    # Hypothesis drives from a thread; every network step runs in the reactor.
    await threads.deferToThread(arbitrary_strings_round_trip, s)


# -- the real processes -------------------------------------------------------------------------

def test_through_twistd_server_and_worker(tmp_path, redis_server, redis_client, monkeypatch):
    monkeypatch.setenv(STRIPE_ENV, f"whsec_rotated_out, {STRIPE_SECRET}")
    idenfy_file = tmp_path / "idenfy.secrets"
    idenfy_file.write_text(f"# iDenfy, this circle only\n{CIRCLE} {IDENFY_SECRET}\n")
    (tmp_path / "stripe.rhai").write_text(f'printf "%s" "$CIRCLES_DATA" > {tmp_path / "event.out"}\n')
    args = ["--listen", "tcp:0:interface=127.0.0.1", "-k", CIRCLE, "--redis-url", redis_server.url,
            "--stripe-script", str(tmp_path / "stripe.rhai"), "--idenfy-secret-file", str(idenfy_file),
            "--log-level", "debug"]  # a line per event (at debug: README, Operations)
    with twistd(args, tmp_path) as server, \
            twistd(["-k", CIRCLE, "--redis-url", redis_server.url, "--exec", "sh {script_file}"], tmp_path,
                   plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        body = encode(stripe_event("evt_twistd", note="ünïcödé \"and\" ${quotes}"))
        status, answer = post_sync(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))
        assert status == 200, answer
        key = f"circles:task:{answer['task_id']}"
        deadline = time.monotonic() + 60
        while redis_client.hgetall(key).get("status") != "completed":
            assert time.monotonic() < deadline, redis_client.hgetall(key)
            time.sleep(0.02)
        assert (tmp_path / "event.out").read_bytes() == body
        # iDenfy with the per-circle secret file; the default script is queued.
        body = encode(idenfy_callback("scan-twistd"))
        status, answer = post_sync(port, f"/webhooks/idenfy/{CIRCLE}", body, idenfy_headers(body))
        assert status == 200
        assert redis_client.hgetall(f"circles:task:{answer['task_id']}")["script"] == webhooks.IDENFY_SCRIPT
        status, answer = post_sync(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body, "whsec_x"))
        assert status == 401 and answer == {"error": "no valid signature"}
    output = server.output + worker.output
    assert "Traceback" not in output
    for secret in (STRIPE_SECRET, "whsec_rotated_out", IDENFY_SECRET):
        assert secret not in output
    assert "webhook stripe payment_intent.succeeded evt_twistd" in server.output


def test_help_shows_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv(STRIPE_ENV, STRIPE_SECRET)
    monkeypatch.setenv(IDENFY_ENV, IDENFY_SECRET)
    result = subprocess.run([TWISTD, "circles", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    for option in ("--stripe-secret-file", "--idenfy-secret-file", "--stripe-script", "--idenfy-script",
                   "--webhook-tolerance", "--max-request-body", "--webhook-max-body"):
        assert option in result.stdout
    assert STRIPE_SECRET not in result.stdout + result.stderr and IDENFY_SECRET not in result.stdout + result.stderr
