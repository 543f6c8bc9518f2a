"""Isolated engines (--isolation process): a script cannot stop its worker, nor read its secrets.

The engines these tests run are in tests/isolation_engines.py (each child imports that module).
End to end: a real server and the real worker (built by its twistd options) on a real
redis-server; no assertion on elapsed time, only on results, their order and processes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import deferLater

from circles import CirclesService, Config
from circles.worker import tap as worker_tap
from circles.worker.engine_child import FRAME, GIVE_BACK, SETTLED, encode_frame
from circles.worker.engines import EngineError, OutputTooLarge, ScriptContext, ScriptTimedOut
from circles.worker.isolation import IsolatedEngine

from ..play_client import RPCClient, eventually, new_key, pk
from ..support import alive

CIRCLE = pk(new_key())
CONTEXT = ScriptContext(task_id="t-1", circle=CIRCLE, caller="03" + "cd" * 32, source="ws", max_output=100_000)
ENGINES = "tests.isolation_engines"
MiB = 1024 * 1024
#: The tiny engine's attack: an array of 8192 references to one 32 KiB string, cheap in steps,
#: whose to_string() builds a string of 256 MiB in one call before any limit is checked.
TINY_ATTACK = ('let s = "x"; while s.len() < 32768 { s += s } let a = [s]; for i in range(0, 13) { a += a } '
               'let t = a.to_string(); t.len()')


def parse(*argv) -> worker_tap.Options:
    options = worker_tap.Options()
    options.parseOptions(list(argv))
    return options


def isolated(name: str, **kw) -> IsolatedEngine:
    return IsolatedEngine(f"{ENGINES}:{name}", reactor=reactor, **kw)


def gone(pid: int) -> bool:
    """Not there at all: reaped, not a zombie."""
    return not os.path.exists(f"/proc/{pid}")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def serve(start, redis_url: str) -> int:
    service = start(CirclesService(Config(listen=("tcp:0:interface=127.0.0.1",), redis_url=redis_url,
                                          circles=[CIRCLE], script_timeout=60), reactor=reactor))
    [port] = await service.when_listening()
    await eventually(service.script_runner.is_connected)
    return port.getHost().port


def worker(start, redis_url: str, *argv):
    """The worker as ``twistd circles-worker -k CIRCLE --redis-url URL *argv`` builds it."""
    options = parse("-k", CIRCLE, "--redis-url", redis_url, *argv)
    return start(worker_tap.makeService(options, reactor))


async def ready(service) -> None:
    """Its engine's children started and the worker heartbeated: plays to its circle are queued."""
    await service.engine.ready()
    await eventually(lambda: service.registered)


async def processing(redis_client) -> str:
    """The key of the task a worker is running (the first one seen)."""
    return await eventually(lambda: next((key for key in redis_client("KEYS", "circles:task:*")
                                          if redis_client.hgetall(key).get("status") == "processing"), None))


def in_order(replies: list, name: str, d: Deferred) -> Deferred:
    return d.addCallback(lambda reply: replies.append((name, reply)) or reply)


# -- end to end: a script cannot hold the worker -------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_spinning_script_times_out_while_the_worker_serves_another(redis_server, start, redis_client):
    """An engine that computes for 60 s: --script-timeout 2 answers it -32003 (reason timeout), and
    a task of the same circle queued after it is answered first; its child is replaced."""
    port = await serve(start, redis_server.url)
    service = worker(start, redis_server.url, "--engine", f"{ENGINES}:spin", "--script-timeout", "2", "-c", "2")
    await ready(service)
    before = service.engine.pids()
    client = await RPCClient.open(port, CIRCLE)
    replies: list = []
    spinning = in_order(replies, "spin", client.call("play", {"script": "spin"}))
    key = await processing(redis_client)
    quick = in_order(replies, "quick", client.call("play", {"script": "quick"}))
    await quick
    await spinning
    assert [name for name, _ in replies] == ["quick", "spin"]
    assert replies[0][1]["result"] == {"output": "quick"}
    assert replies[1][1]["error"]["code"] == -32003, replies[1][1]
    assert redis_client.hgetall(key)["reason"] == "timeout"
    after = await eventually(lambda: len(service.engine.pids()) == 2 and service.engine.pids())
    assert len(set(before) - set(after)) == 1  # the spinning one went, another took its place
    await eventually(lambda: all(gone(pid) for pid in set(before) - set(after)))
    assert (await client.call("play", {"script": "quick"}))["result"] == {"output": "quick"}
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_script_allocating_without_end_is_refused_and_the_worker_serves_on(redis_server, start, redis_client):
    port = await serve(start, redis_server.url)
    service = worker(start, redis_server.url, "--engine", f"{ENGINES}:allocate", "--script-timeout", "20",
                     "--max-script-memory", str(64 * MiB), "-c", "2")
    await ready(service)
    before = service.engine.pids()
    client = await RPCClient.open(port, CIRCLE)
    replies = [await client.call("play", {"script": script}) for script in ("allocate", "quick")]
    assert replies[0]["error"]["code"] == -32005, replies[0]
    assert replies[0]["error"]["data"] == f"script exceeded its memory limit ({64 * MiB} bytes)"
    assert replies[1]["result"] == {"output": "quick"}
    after = await eventually(lambda: len(service.engine.pids()) == 2 and service.engine.pids())
    assert len(set(before) - set(after)) == 1
    client.close()


@pytest_twisted.ensureDeferred
async def test_the_worker_stops_while_a_script_spins(redis_server, start, redis_client):
    """stopService while a script computes: the script is stopped at its timeout and answered so,
    the stop completes, and no child of the engine is left."""
    port = await serve(start, redis_server.url)
    service = worker(start, redis_server.url, "--engine", f"{ENGINES}:spin", "--script-timeout", "3", "-c", "3")
    await ready(service)
    children = service.engine.pids()
    client = await RPCClient.open(port, CIRCLE)
    spinning = client.call("play", {"script": "spin"})
    await processing(redis_client)
    await service.stopService()
    assert (await spinning)["error"]["code"] == -32003
    assert service.engine.pids() == []
    assert all(gone(pid) for pid in children)
    client.close()


@pytest_twisted.ensureDeferred
async def test_the_tiny_engine_attack_is_refused_and_the_pool_stays_whole(redis_server, start):
    """The attack through the default engine, isolated, with a low --max-script-memory: refused
    by one of the bounds (the engine's own accounting stops it before the child's RLIMIT_AS is
    reached; either is a refusal), the worker answers the next play, the pool is whole again."""
    port = await serve(start, redis_server.url)
    service = worker(start, redis_server.url, "--engine", "circles.worker.tiny_engine:run",
                     "--max-script-memory", str(32 * MiB), "-c", "1")
    await ready(service)
    client = await RPCClient.open(port, CIRCLE)
    refused = await client.call("play", {"script": TINY_ATTACK})
    assert refused["error"]["code"] == -32005, refused
    assert any(bound in refused["error"]["data"] for bound in (
        "string longer than", "script memory limit exceeded", "script exceeded its memory limit")), refused
    assert (await client.call("play", {"script": "40 + 2"}))["result"] == {"output": "42"}
    await eventually(lambda: len(service.engine.pids()) == 1)
    client.close()


# -- the isolated engine itself ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_children_are_started_ahead_and_reused():
    engine = isolated("echo", size=2)
    await engine.start()
    pids = engine.pids()
    assert len(pids) == 2
    outputs = [await engine(f"s{i}", CONTEXT) for i in range(6)]
    assert [o.split(":", 1)[1] for o in outputs] == [f"s{i}" for i in range(6)]
    assert len({o.split(":")[0] for o in outputs}) <= 2  # no process started per script
    assert engine.pids() == pids
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_engine_errors_keep_their_text():
    tiny = IsolatedEngine("circles.worker.tiny_engine:run", reactor=reactor)
    with pytest.raises(EngineError, match="^line 1, column .*variable not found: nope$"):
        await tiny("nope", CONTEXT)
    pid = tiny.pids()
    assert await tiny("6 * 7", CONTEXT) == "42"
    assert tiny.pids() == pid  # a script's error is no reason to replace its child
    await tiny.stop()
    engine = isolated("raises")
    with pytest.raises(EngineError) as e:
        await engine("x", CONTEXT)
    assert str(e.value) == "ValueError: bad script 'x'"  # as the worker says an in-process engine's bug
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_child_that_dies_is_an_error_and_is_replaced():
    engine = isolated("dies", size=1)
    await engine.start()
    [before] = engine.pids()
    with pytest.raises(EngineError, match=r"^the engine's process died running the script \(exit status 3\)$"):
        await engine("x", CONTEXT)
    await engine.ready()
    [after] = engine.pids()
    assert after != before
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_cancelling_kills_the_child_and_replaces_it():
    engine = isolated("spin", size=1)
    await engine.start()
    [before] = engine.pids()
    d = engine("spin", CONTEXT)
    await eventually(lambda: engine._children and next(iter(engine._children)).job is not None)
    d.cancel()  # what the worker's timeout does
    with pytest.raises(CancelledError):
        await d
    await eventually(lambda: gone(before))
    await engine.ready()
    assert await engine("quick", CONTEXT) == "quick"
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_rlimit_cpu_is_a_backstop_to_the_kill():
    """Nobody cancels: the script's CPU limit ends it, as a timeout."""
    engine = isolated("spin", cpu_seconds=1)
    with pytest.raises(ScriptTimedOut, match="^script used more than 1s of CPU$") as e:
        await engine("spin", CONTEXT)
    assert e.value.reason == "timeout"
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_output_is_capped_in_the_child_and_the_frame_size_in_the_worker():
    engine = isolated("big", size=1)
    assert await engine("5", CONTEXT) == "xxxxx"
    with pytest.raises(OutputTooLarge, match="^output too large: 2000 bytes, the limit is 1000$"):
        await engine("2000", attrs.evolve(CONTEXT, max_output=1000))
    await engine.stop()
    # A child announcing a frame larger than the cap allows is killed at once, never read.
    spinning = isolated("spin", size=1)
    d = spinning("spin", attrs.evolve(CONTEXT, max_output=1000))
    child = await eventually(lambda: next((c for c in spinning._children if c.job is not None), None))
    child.outReceived(FRAME.pack(10, 50 * MiB))
    with pytest.raises(OutputTooLarge, match="^output too large: more than 1000 bytes$"):
        await d
    await eventually(lambda: gone(child.pid))
    await spinning.stop()


@pytest_twisted.ensureDeferred
async def test_what_an_engine_prints_does_not_reach_the_protocol():
    engine = isolated("prints")
    assert await engine("x", CONTEXT) == "fine"
    assert await engine("x", CONTEXT) == "fine"
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_child_is_replaced_after_so_many_scripts():
    engine = isolated("echo", size=1, tasks_per_child=3)
    await engine.start()
    pids = [(await engine("x", CONTEXT)).split(":")[0] for _ in range(7)]
    assert [len(set(pids[i:i + 3])) for i in (0, 3)] == [1, 1] and len(set(pids)) == 3
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_max_memory_reaches_the_engine():
    engine = isolated("environment", max_memory=50 * MiB)
    seen = json.loads(await engine("x", CONTEXT))
    assert seen["max_memory"] == 50 * MiB and seen["max_output"] == CONTEXT.max_output
    seen = json.loads(await engine("x", attrs.evolve(CONTEXT, max_memory=MiB)))
    assert seen["max_memory"] == MiB  # the worker's own, when it gives one
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_process_and_no_descriptor():
    fds = open_fds()
    engine = isolated("spin", size=3)
    await engine.start()
    pids = engine.pids()
    assert await engine("quick", CONTEXT) == "quick"
    running = engine("spin", CONTEXT)
    await eventually(lambda: any(c.job is not None for c in engine._children))
    await engine.stop()
    with pytest.raises(EngineError, match="stopped while the script ran"):
        await running
    assert engine.pids() == [] and all(gone(pid) for pid in pids)
    assert open_fds() == fds
    with pytest.raises(EngineError, match="stopping"):
        engine("quick", CONTEXT)


@pytest_twisted.ensureDeferred
async def test_an_engine_that_cannot_load_is_an_error_each_time():
    engine = IsolatedEngine("tests.isolation_engines:missing", reactor=reactor)
    for _ in range(2):
        with pytest.raises(EngineError, match="^the engine cannot be loaded: tests.isolation_engines has no missing$"):
            await engine("x", CONTEXT)
    await engine.stop()


# -- secrets stay the worker's ---------------------------------------------------------------------

SECRETS = {"STRIPE_WEBHOOK_SECRET": "whsec_do_not_leak", "REDIS_URL": "redis://:hunter2@redis.internal:6379/0",
           "AWS_SECRET_ACCESS_KEY": "aws-do-not-leak", "FOO": "operator-chose-this"}


def worker_environment(monkeypatch) -> None:
    monkeypatch.delenv("CIRCLES_REDIS_URL", raising=False)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def environment_of(output: str) -> dict:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


@pytest_twisted.ensureDeferred
async def test_exec_scripts_see_an_allow_list_and_a_private_directory(tmp_path, monkeypatch):
    worker_environment(monkeypatch)
    base = ("-k", CIRCLE, "--state-dir", str(tmp_path), "--exec", "sh {script_file}")
    script = 'env; echo "CWD=$(pwd)"; echo "MODE=$(stat -c %a .)"; echo "SCRIPT=$0"'
    context = attrs.evolve(CONTEXT, attempt=2, data='{"event": 1}')
    for argv, foo in [((), False), (("--exec-env", "FOO"), True)]:
        seen = environment_of(await parse(*base, *argv).engine(script, context))
        for name in ("STRIPE_WEBHOOK_SECRET", "REDIS_URL", "AWS_SECRET_ACCESS_KEY"):
            assert name not in seen
        assert "hunter2" not in json.dumps(seen) and "do_not_leak" not in json.dumps(seen)
        assert ("FOO" in seen) == foo and (not foo or seen["FOO"] == SECRETS["FOO"])
        assert seen["CIRCLES_ATTEMPT"] == "2" and seen["CONTEXT_ID"] == CIRCLE and seen["CALLER_ID"] == CONTEXT.caller
        home = seen["HOME"]
        assert seen["TMPDIR"] == home == seen["CWD"] and seen["MODE"] == "700"
        assert os.path.basename(home).startswith("circles-script-")
        assert os.path.dirname(seen["SCRIPT"]) == home == os.path.dirname(seen["CIRCLES_DATA_FILE"])
        assert not os.path.exists(home)  # removed once the script ended
    other = environment_of(await parse(*base).engine(script, context))
    assert other["HOME"] != home  # a fresh one per script


@pytest_twisted.ensureDeferred
async def test_isolated_engines_see_an_allow_list_and_a_private_directory(tmp_path, monkeypatch):
    worker_environment(monkeypatch)
    base = ("-k", CIRCLE, "--state-dir", str(tmp_path), "--engine", f"{ENGINES}:environment")
    for argv, foo in [((), False), (("--exec-env", "FOO"), True)]:
        engine = parse(*base, *argv).engine
        assert isinstance(engine, IsolatedEngine)
        seen = json.loads(await engine("litter", attrs.evolve(CONTEXT, attempt=3)))
        environ = seen["environ"]
        for name in ("STRIPE_WEBHOOK_SECRET", "REDIS_URL", "AWS_SECRET_ACCESS_KEY"):
            assert name not in environ
        assert "hunter2" not in json.dumps(environ) and "do_not_leak" not in json.dumps(environ)
        assert ("FOO" in environ) == foo
        assert environ["CIRCLES_ATTEMPT"] == "3" and environ["CONTEXT_ID"] == CIRCLE
        assert environ["HOME"] == environ["TMPDIR"] == seen["cwd"]
        assert seen["files"] == [] and seen["mode"] == 0o700
        child_home = os.path.dirname(seen["cwd"])
        assert stat.S_IMODE(os.stat(child_home).st_mode) == 0o700
        assert not os.path.exists(seen["cwd"])  # the script left a file: its directory went with it
        second = json.loads(await engine("x", CONTEXT))
        assert second["cwd"] != seen["cwd"] and second["files"] == []  # nothing of the script before
        assert second["environ"]["CIRCLES_ATTEMPT"] == "1"
        await engine.stop()
        assert not os.path.exists(child_home)  # the child's own directory goes with the child


# -- options -------------------------------------------------------------------------------------

def test_isolation_options(tmp_path, monkeypatch):
    from twisted.python import usage

    monkeypatch.delenv("CIRCLES_REDIS_URL", raising=False)
    base = ("-k", CIRCLE, "--state-dir", str(tmp_path))
    engine = parse(*base, "--engine", f"{ENGINES}:echo", "-c", "3", "--script-timeout", "2.5").engine
    assert isinstance(engine, IsolatedEngine)
    assert (engine.size, engine.max_memory, engine.cpu_seconds) == (3, 256 * MiB, 4)
    engine = parse(*base, "--engine", f"{ENGINES}:echo", "--max-script-memory", "0").engine
    assert engine.max_memory is None
    inline = parse(*base, "--engine", f"{ENGINES}:environment", "--isolation", "none",
                   "--max-script-memory", str(MiB)).engine
    assert json.loads(inline("x", CONTEXT))["max_memory"] == MiB  # in-process: given to the engine
    service = worker_tap.makeService(parse(*base, "--engine", f"{ENGINES}:echo"), reactor)
    assert isinstance(service, worker_tap.IsolatingWorker) and service.engine.reactor is reactor
    exec_engine = parse(*base, "--exec", "sh {script_file}", "--max-script-memory", str(100 * MiB)).engine
    assert exec_engine.limits == {"as": 100 * MiB, "cpu": 31}
    for argv in [("--engine", f"{ENGINES}:echo", "--isolation", "thread"),
                 ("--exec", "sh {script_file}", "--isolation", "process"),
                 ("--engine", f"{ENGINES}:echo", "--max-script-memory", "-1"),
                 ("--engine", f"{ENGINES}:echo", "--exec-env", "A=B")]:
        with pytest.raises(usage.UsageError):
            parse(*base, *argv)


@pytest_twisted.ensureDeferred
async def test_exec_commands_get_the_rlimits(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCLES_REDIS_URL", raising=False)
    engine = parse("-k", CIRCLE, "--state-dir", str(tmp_path), "--exec", "sh {script_file}",
                   "--max-script-memory", str(100 * MiB), "--script-timeout", "5").engine
    assert await engine("ulimit -v; ulimit -t", CONTEXT) == f"{100 * 1024}\n6"
    # SCHED_BATCH (3): field 41 of its stat; the shell's name has no space.
    assert (await engine("cut -d' ' -f41 /proc/$$/stat", CONTEXT)).strip() == str(os.SCHED_BATCH)
    with pytest.raises(EngineError, match="^exit status"):
        # 200 MiB in one string: more address space than the command may have.
        await engine(f"exec {__import__('sys').executable} -c 'x = bytearray(200 * 2**20)'", CONTEXT)


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_or_killed_worker_leaves_no_engine_process_behind(tmp_path, how):
    """`twistd circles-worker --engine ...` stopped (SIGTERM) or killed (kill -9): its engine
    children end with it; stopped, it says nothing went wrong."""
    import time

    from websockets.sync.client import connect

    from ..support import Key, request, twistd

    circle = Key()
    with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--engine", "circles.worker.tiny_engine:run", "-c", "2"], tmp_path,
                   plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "play", {"script": "6 * 7"})["result"] == {"output": "42"}
        deadline = time.monotonic() + 60
        while True:  # two supervisors, each with its engine process
            supervisors = children_of(worker.proc.pid)
            engines = [pid for supervisor in supervisors for pid in children_of(supervisor)]
            if len(supervisors) == 2 and len(engines) == 2:
                break
            assert time.monotonic() < deadline, worker.output
            time.sleep(0.05)
        if how == "SIGKILL":
            worker.proc.kill()
            worker.proc.wait()
        else:
            assert worker.stop() in (0, -15), worker.output  # twistd ends by the signal it was stopped with
            assert "Traceback" not in worker.output, worker.output
        while any(alive(pid) for pid in supervisors + engines):
            assert time.monotonic() < deadline, "an engine process outlived its worker"
            time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_a_directory_left_empty_is_reused_and_one_left_changed_is_not():
    # Past engine_child.SETTLED seconds the child no longer lists a directory whose lstat has not
    # changed: a file left behind must still be seen, even with the directory's mtime set back.
    engine = isolated("environment", size=1)
    await engine.start()
    pid = engine.pids()
    first = json.loads(await engine("x", CONTEXT))
    await deferLater(reactor, SETTLED + 0.2, lambda: None)
    for script in ("x", "x", "litter-hidden"):  # found empty and settled, then by its lstat alone
        seen = json.loads(await engine(script, CONTEXT))
        assert seen["cwd"] == first["cwd"] and seen["files"] == []
    after = json.loads(await engine("x", CONTEXT))
    assert after["cwd"] != first["cwd"] and after["files"] == []  # the littered one went
    assert not os.path.exists(first["cwd"])
    assert engine.pids() == pid
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_script_that_removes_its_childs_directory_harms_no_other():
    engine = isolated("vandal", size=1)
    await engine.start()
    pids = engine.pids()
    assert [await engine("x", CONTEXT) for _ in range(3)] == ["removed"] * 3
    assert engine.pids() == pids  # the same child, each script in a new directory
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_deferreds_that_fired_are_answers_and_others_are_said_so():
    assert await isolated("fired")("x", CONTEXT) == "fired x"
    engine = isolated("waits")
    with pytest.raises(EngineError, match="had not fired when it returned.*--isolation none"):
        await engine("x", CONTEXT)
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_script_waiting_for_a_child_can_time_out_too():
    engine = isolated("spin", size=1)
    await engine.start()
    running = engine("spin", CONTEXT)
    waiting = engine("quick", CONTEXT)
    await eventually(lambda: engine._queue)
    waiting.cancel()
    with pytest.raises(CancelledError):
        await waiting
    assert len(engine._queue) == 0 and not running.called
    running.cancel()
    with pytest.raises(CancelledError):
        await running
    assert await engine("quick", CONTEXT) == "quick"
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_large_scripts_and_outputs_cross_the_pipes_whole():
    engine = isolated("echo", max_output=4_000_000)
    script = "é" * 600_000 + "\ud800"  # 1.2 MB of UTF-8, more than a pipe holds, and a lone surrogate
    output = await engine(script, attrs.evolve(CONTEXT, max_output=2_000_000))
    assert output.split(":", 1)[1] == script
    await engine.stop()


# -- scripts queued behind another in a child ------------------------------------------------------

def ran(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest_twisted.ensureDeferred
async def test_scripts_queued_behind_a_long_one_are_taken_back_and_run_in_another_child(tmp_path):
    engine = isolated("record", size=2)
    await engine.start()
    spinning = engine("spin", CONTEXT)
    queued = [engine(f"{tmp_path / 'ran'}:s{i}", CONTEXT) for i in range(3)]
    [busy] = [child for child in engine._children if child.jobs]
    assert len(busy.jobs) == 4  # sent behind the spinning one, to start when it ends
    pids = [await d for d in queued]  # the spinning one runs 60 s: they were taken back
    assert not spinning.called and busy.job is not None and not busy.killed
    assert str(busy.engine_pid) not in pids and len(set(pids)) == 1
    assert ran(tmp_path / "ran") == ["s0", "s1", "s2"]  # each once, in their order
    spinning.cancel()
    with pytest.raises(CancelledError):
        await spinning
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_child_that_dies_or_fails_ran_none_of_what_it_held_after(tmp_path):
    engine = isolated("record", size=2)
    await engine.start()
    log = tmp_path / "ran"
    for failing, error in (("die", r"^the engine's process died running the script \(exit status 3\)$"),
                           ("raise", r"^ValueError: a bug$")):
        calls = [engine(f"{log}:before-{failing}", CONTEXT), engine(failing, CONTEXT)]
        calls += [engine(f"{log}:after-{failing}-{i}", CONTEXT) for i in range(2)]
        assert max(len(child.jobs) for child in engine._children) == 4  # all four in one child
        first = await calls[0]
        with pytest.raises(EngineError, match=error):
            await calls[1]
        after = [await d for d in calls[2:]]
        assert first not in after  # the one that failed was replaced, what it held ran elsewhere
    # Each exactly once: the failed child had started none of those behind the failing script.
    assert ran(log) == ["before-die", "after-die-0", "after-die-1",
                        "before-raise", "after-raise-0", "after-raise-1"]
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_script_past_its_deadline_while_queued_never_runs(tmp_path):
    engine = isolated("record", size=1)
    await engine.start()
    spinning = engine("spin", CONTEXT)
    late = engine(f"{tmp_path / 'ran'}:late", CONTEXT)
    on_time = engine(f"{tmp_path / 'ran'}:on-time", CONTEXT)
    [child] = engine._children
    assert len(child.jobs) == 3
    late.cancel()  # the worker's timeout, while it waits behind the spinning one
    with pytest.raises(CancelledError):
        await late
    # Taken back, it is dropped; the other one waits for a child (the only one spins), then runs.
    await eventually(lambda: len(child.jobs) == 1 and not child.giving_back)
    assert child.job is not None and not child.job.cancelled and not spinning.called
    spinning.cancel()
    with pytest.raises(CancelledError):
        await spinning
    assert await on_time != str(child.engine_pid)
    assert ran(tmp_path / "ran") == ["on-time"]
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_child_answers_its_scripts_before_it_is_replaced(tmp_path):
    engine = isolated("record", size=1, tasks_per_child=3)
    await engine.start()
    pids = await DeferredList([engine(f"{tmp_path / 'ran'}:s{i}", CONTEXT) for i in range(7)], fireOnOneErrback=True)
    pids = [pid for _, pid in pids]
    assert [len(set(pids[i:i + 3])) for i in (0, 3)] == [1, 1] and len(set(pids)) == 3  # none killed mid-way
    assert ran(tmp_path / "ran") == [f"s{i}" for i in range(7)]
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_engine_children_run_under_sched_batch():
    """Woken by a frame, a child does not take the CPU from the worker still writing frames to others."""
    engine = isolated("policy", size=1)
    try:
        assert await engine("", CONTEXT) == str(os.SCHED_BATCH)
    finally:
        await engine.stop()


def test_take_backs_never_cut_a_frame(tmp_path):
    """The take-back signal, sent again and again to a real child while it writes replies larger
    than a pipe holds (its writes wait part-way for us to read): every frame comes whole, every
    reply intact, each take-back answered once with the scripts started so far, and every
    script started is answered."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen([sys.executable, "-m", "circles.worker.engine_child"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=tmp_path, env={"PATH": os.defpath, "PYTHONPATH": root})
    size = 150_000  # more than twice what a pipe holds
    context = dict(attrs.asdict(CONTEXT), max_output=size)

    def send(header: dict, body: bytes = b"") -> None:
        child.stdin.write(encode_frame(header, body))
        child.stdin.flush()

    def receive() -> tuple[dict, bytes] | None:
        head = child.stdout.read(FRAME.size)
        if not head:
            return None
        header_size, body_size = FRAME.unpack(head)
        return json.loads(child.stdout.read(header_size)), child.stdout.read(body_size)

    try:
        send({"kind": "init", "spec": f"{ENGINES}:big", "path": [root], "max_memory": 0})
        ready, _ = receive()
        answered = started = 0
        for epoch in range(30):
            for _ in range(4):
                send({"kind": "task", "context": context, "cpu": 0, "epoch": epoch}, str(size).encode())
            time.sleep(0.01)  # pacing only: the child is likely blocked in a reply's write by now
            os.kill(ready["pid"], GIVE_BACK)
            while True:
                header, body = receive()
                if header["kind"] == "returned":
                    assert answered <= header["started"] <= answered + 1  # at most the one running
                    assert header["started"] >= started
                    started = header["started"]
                    break
                assert header == {"kind": "done"} and body == b"x" * size
                answered += 1
        child.stdin.close()
        while (frame := receive()) is not None:  # the reply of a script started before the last take-back
            assert frame == ({"kind": "done"}, b"x" * size)
            answered += 1
        assert answered == started >= 30
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()


@pytest_twisted.ensureDeferred
async def test_depth_one_sends_a_child_one_script_at_a_time(tmp_path):
    engine = isolated("record", size=2, depth=1)
    await engine.start()
    calls = [engine(f"{tmp_path / 'ran'}:s{i}", CONTEXT) for i in range(5)]
    assert sorted(len(child.jobs) for child in engine._children) == [1, 1] and len(engine._queue) == 3
    await DeferredList(calls, fireOnOneErrback=True)
    assert sorted(ran(tmp_path / "ran")) == [f"s{i}" for i in range(5)]
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_child_that_does_not_answer_a_take_back_is_replaced_once_idle(tmp_path):
    engine = isolated("record", size=1)
    await engine.start()
    deaf = engine(f"{tmp_path / 'ran'}:deaf", CONTEXT)
    queued = engine(f"{tmp_path / 'ran'}:queued", CONTEXT)
    [child] = engine._children
    await eventually(lambda: ran(tmp_path / "ran") == ["deaf"])  # it runs, deaf to the signal
    queued.cancel()  # asks for it back: the engine ignores the signal
    with pytest.raises(CancelledError):
        await queued
    pid = await deaf
    assert child.giving_back
    await eventually(lambda: gone(int(pid)))  # idle and silent: replaced, not held out of use
    await engine.ready()
    assert await engine(f"{tmp_path / 'ran'}:after", CONTEXT) != pid
    # The engine broke the take-back: the cancelled script ran all the same (its answer dropped).
    assert ran(tmp_path / "ran") == ["deaf", "queued", "after"]
    await engine.stop()


@pytest_twisted.ensureDeferred
async def test_a_child_that_cannot_be_started_fails_the_script_waiting_and_the_next_tries_again(monkeypatch):
    engine = isolated("echo", size=1)
    spawn = engine._spawn

    def no_fork():
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(engine, "_spawn", no_fork)
    for _ in range(3):
        with pytest.raises(EngineError, match="^cannot start the engine's process: Resource temporarily unavailable$"):
            await engine("x", CONTEXT)
    monkeypatch.setattr(engine, "_spawn", spawn)
    assert (await engine("x", CONTEXT)).endswith(":x")
    await engine.stop()
