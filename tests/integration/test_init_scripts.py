"""Init scripts (``-k PK:FILE``) and the Rust server's command line (``--tls --cert --key``).

An init script runs once in its circle when the circle's first worker comes up: queued by a
server that sees the worker in its housekeeping round, or run by a worker given the same
``-k PK:FILE`` itself; "once" is a key in Redis named by the circle and the script's digest
(circles/backend/init_scripts.py). Real redis-servers throughout: servers and workers in this
process first (their logs and Redis keys read directly), then real ``twistd`` processes, and the
seed's exact command line served to a real TLS WebSocket client. (The options parsed:
tests/unit/test_init_scripts.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from websockets.sync.client import connect

from circles import CirclesService, Config
from circles.backend.init_scripts import InitScript, once_key
from circles.backend.redis_url import parse_redis_url
from circles.worker.engines import EngineError
from circles.worker.service import Worker
from devtools.twistd import TWISTD

from ..play_client import RPCClient, eventually, sleep
from ..support import Key, request, twistd

CIRCLE = Key(b"\x03" * 32).pubkey
INIT = InitScript(CIRCLE, 'print("initialized")', "init.rhai")
FAST = {"heartbeat": 0.2, "worker_ttl": 1.0}


@pytest.fixture
def events():
    """Every log event of this process during the test."""
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def lines(events: list, text: str, level: LogLevel | None = None) -> list[str]:
    found = [formatEvent(e) for e in events if level is None or e.get("log_level") == level]
    return [line for line in found if line and text in line]


def server(redis_server, init: InitScript | None = INIT, **config) -> CirclesService:
    return CirclesService(Config(listen=("tcp:0:interface=127.0.0.1",), redis_url=redis_server.url, circles=[CIRCLE],
                                 init_scripts=[init] if init else [], drain_grace=0, **config), reactor=reactor)


def worker(redis_server, engine, **kw) -> Worker:
    return Worker(parse_redis_url(redis_server.url), [CIRCLE], engine, reactor=reactor, **{**FAST, **kw})


class Engine:
    """Records each script it runs as ``(script, caller, source)``; an init script is answered
    with ``init`` (a value, a Deferred, or an exception to raise), anything else with "ok"."""

    def __init__(self, init=None) -> None:
        self.runs: list[tuple[str, str, str]] = []
        self.init = "initialized" if init is None else init

    def __call__(self, script, context):
        self.runs.append((script, context.caller, context.source))
        if context.source != "init":
            return "ok"
        if isinstance(self.init, Exception):
            raise self.init
        return self.init

    @property
    def inits(self) -> list:
        return [run for run in self.runs if run[2] == "init"]


async def port_of(service: CirclesService) -> int:
    [port] = await service.when_listening()
    return port.getHost().port


async def play(service: CirclesService, script: str = "print(1)") -> dict:
    client = await RPCClient.open(await port_of(service), CIRCLE)
    try:
        return await client.call("play", {"script": script})
    finally:
        client.close()


# -- servers --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_servers_run_an_init_script_once_when_the_circles_first_worker_comes_up(redis_server, redis_client,
                                                                                     start, events):
    first, second = start(server(redis_server)), start(server(redis_server))
    # A housekeeping round of each has read the circle: no worker, so nothing is claimed or run.
    await eventually(lambda: all(s.script_runner.housekeeping.circle_stats.get(CIRCLE) == (0, 0)
                                 for s in (first, second)))
    assert len(lines(events, f"init script init.rhai of circle {CIRCLE}: waiting for the circle's first worker")) == 2
    assert redis_client("KEYS", "circles:init:*") == []

    engine = Engine()
    start(worker(redis_server, engine))
    await eventually(lambda: lines(events, "ran; its output: 'initialized'")
                     and lines(events, "not run by this server"))
    # Once, by one of the two servers; caller: the circle itself; source: init.
    assert engine.runs == [('print("initialized")', CIRCLE, "init")]
    assert len(lines(events, f"init script init.rhai of circle {CIRCLE} ran; its output: 'initialized'",
                     LogLevel.info)) == 1
    key = once_key("circles:", INIT)
    assert redis_client("GET", key).startswith("completed: server ")
    assert redis_client("TTL", key) == -1  # kept: a restart with the same script does not run it again
    assert (await play(first))["result"] == {"output": "ok"}

    # A server started later (a restart) with the same script: not run again; with a changed one: run.
    start(server(redis_server))
    await eventually(lambda: len(lines(events, "not run by this server")) == 2)
    assert lines(events, "not run by this server")[-1].endswith(f"({key}: {redis_client('GET', key)})")
    changed = InitScript(CIRCLE, 'print("initialized, v2")', "init.rhai")
    start(server(redis_server, changed))
    await eventually(lambda: len(engine.inits) == 2)
    assert engine.inits[1] == ('print("initialized, v2")', CIRCLE, "init")
    await eventually(lambda: redis_client("GET", once_key("circles:", changed)) or "")
    assert len(engine.inits) == 2


@pytest_twisted.ensureDeferred
async def test_a_failing_init_script_is_logged_loudly_and_the_server_still_serves(redis_server, redis_client, start,
                                                                                events):
    error = EngineError("no database here")
    error.output = "half done"
    engine = Engine(init=error)
    service = start(server(redis_server))
    start(worker(redis_server, engine))
    await eventually(lambda: lines(events, "FAILED", LogLevel.error))
    [line] = lines(events, "FAILED", LogLevel.error)
    assert line == (f"init script init.rhai of circle {CIRCLE} FAILED (error): 'no database here'; its output: "
                    f"'half done'. It runs again at the next start of a server or worker given it")
    assert redis_client("KEYS", "circles:init:*") == []  # given up: the next start runs it again
    assert (await play(service))["result"] == {"output": "ok"}
    assert len(engine.inits) == 1  # not again by this server

    start(server(redis_server))  # the next start
    await eventually(lambda: len(lines(events, "FAILED", LogLevel.error)) == 2)
    assert len(engine.inits) == 2


@pytest_twisted.ensureDeferred
async def test_an_init_script_cut_short_by_a_stop_runs_at_the_next_start(redis_server, redis_client, start, events):
    engine = Engine(init=Deferred())  # runs until the worker's timeout
    service = start(server(redis_server))
    start(worker(redis_server, engine, script_timeout=3))
    await eventually(lambda: engine.inits)
    key = once_key("circles:", INIT)
    assert redis_client("GET", key).startswith("running: server ")
    assert 30 < redis_client("TTL", key) <= 30 + 60  # the claim lasts the script's timeout and a grace
    await service.stopService()
    assert redis_client("KEYS", "circles:init:*") == []
    assert lines(events, "not finished when the server stopped; it runs again at the next start", LogLevel.warn)


@pytest_twisted.ensureDeferred
async def test_an_init_script_waits_for_a_worker_that_never_comes(redis_server, redis_client, start, events):
    service = start(server(redis_server))
    rounds = 0

    def count(stats):
        nonlocal rounds
        rounds += 1

    service.script_runner.housekeeping.watchers.append(count)
    await eventually(lambda: rounds >= 3, timeout=60)
    assert lines(events, "waiting for the circle's first worker")
    assert redis_client("KEYS", "circles:init:*") == []
    assert service.init_scripts.waiting == {CIRCLE: INIT}


# -- workers --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_worker_given_the_init_script_runs_it_before_the_circles_tasks(redis_server, redis_client, start,
                                                                              events):
    init_done: Deferred = Deferred()
    engine = Engine(init=init_done)
    service = start(server(redis_server))
    await eventually(service.script_runner.is_connected)
    first = start(worker(redis_server, engine, concurrency=2, init_scripts=[INIT]))
    await eventually(lambda: engine.inits)
    key = once_key("circles:", INIT)
    assert redis_client("GET", key).startswith(f"running: worker {first.worker_id} since ")
    # The worker is live while its init script runs, but takes none of the circle's tasks (a slot is free).
    answer = ensureDeferred(play(service))
    await eventually(lambda: redis_client("LLEN", f"circles:queue:{CIRCLE}") == 1)
    await sleep(1)  # five heartbeats of the worker
    assert first.registered and redis_client("LLEN", f"circles:queue:{CIRCLE}") == 1
    assert [run[2] for run in engine.runs] == ["init"]
    init_done.callback("initialized")
    assert (await answer)["result"] == {"output": "ok"}
    assert redis_client("GET", key).startswith(f"completed: worker {first.worker_id} at ")
    assert lines(events, f"init script init.rhai of circle {CIRCLE} ran; its output: 'initialized'", LogLevel.info)
    # The server saw the worker live only once the claim was in: it left the script to it.
    await eventually(lambda: lines(events, "not run by this server"))
    # Another worker given it: not again, and its tasks are not held.
    second = start(worker(redis_server, engine, init_scripts=[INIT]))
    await eventually(lambda: lines(events, "not run by this worker"))
    await first.stopService()
    assert (await play(service))["result"] == {"output": "ok"}
    assert second.registered and len(engine.inits) == 1


@pytest_twisted.ensureDeferred
async def test_a_worker_whose_init_script_fails_says_so_and_serves(redis_server, redis_client, start, events):
    engine = Engine(init=EngineError("exit status 3: boom"))
    service = start(server(redis_server, init=None))
    start(worker(redis_server, engine, init_scripts=[INIT]))
    await eventually(lambda: lines(events, "FAILED", LogLevel.error))
    assert lines(events, "FAILED (error): 'exit status 3: boom'")
    assert redis_client("KEYS", "circles:init:*") == []
    assert (await play(service))["result"] == {"output": "ok"}


# -- twistd processes ---------------------------------------------------------------------------

TRACE_SCRIPT = 'echo "$CIRCLES_SOURCE $CALLER_ID $CONTEXT_ID" >> {trace}\necho initialized\n'
SHELL = ["--exec", "sh {script_file}"]


def ws_play(port: int, script: str = "echo played") -> dict:
    with connect(f"ws://127.0.0.1:{port}/{CIRCLE}", open_timeout=30) as ws:
        return request(ws, "play", {"script": script})


def test_twistd_runs_the_init_script_once(tmp_path, redis_server):
    trace = tmp_path / "trace"
    (tmp_path / "init.sh").write_text(TRACE_SCRIPT.format(trace=trace))
    common = ["--redis-url", redis_server.url]
    with twistd([*common, "--listen", "tcp:0:interface=127.0.0.1", "-k", f"{CIRCLE}:init.sh"], tmp_path) as first:
        port = first.wait_listening()
        first.wait_for("init script init.sh of circle")
        assert "waiting for the circle's first worker" in first.output and not trace.exists()
        with twistd([*common, "-k", CIRCLE, *SHELL], tmp_path, plugin="circles-worker"):
            first.wait_for("ran; its output: 'initialized'")
            assert trace.read_text() == f"init {CIRCLE} {CIRCLE}\n"
            assert ws_play(port)["result"] == {"output": "played"}
            # a worker given the same init script, and a server started later: not again
            with twistd([*common, "-k", f"{CIRCLE}:init.sh", *SHELL], tmp_path, plugin="circles-worker") as other:
                other.wait_for("not run by this worker")
            with twistd([*common, "--listen", "tcp:0:interface=127.0.0.1", "-c", f"{CIRCLE}:init.sh"],
                         tmp_path) as later:
                later.wait_for("not run by this server")
    assert trace.read_text() == f"init {CIRCLE} {CIRCLE}\n"
    assert "Traceback" not in first.output


def test_of_several_server_processes_the_first_alone_handles_init_scripts(tmp_path, redis_server):
    trace = tmp_path / "trace"
    (tmp_path / "init.sh").write_text(TRACE_SCRIPT.format(trace=trace))
    common = ["--redis-url", redis_server.url]
    with twistd([*common, "--port", "0", "--interface", "127.0.0.1", "--processes", "2", "-k", f"{CIRCLE}:init.sh"],
                tmp_path) as server:
        server.wait_for("started server process 2")
        with twistd([*common, "-k", CIRCLE, *SHELL], tmp_path, plugin="circles-worker"):
            server.wait_for("ran; its output: 'initialized'")
            assert trace.read_text() == f"init {CIRCLE} {CIRCLE}\n"
    assert server.output.count("waiting for the circle's first worker") == 1
    assert "not run by this server" not in server.output  # the other process was not given it


def test_twistd_logs_a_failing_init_script_loudly_and_serves(tmp_path, redis_server):
    (tmp_path / "init.sh").write_text("echo half done\necho no database here >&2\nexit 3\n")
    common = ["--redis-url", redis_server.url]
    with twistd([*common, "--listen", "tcp:0:interface=127.0.0.1", "-k", f"{CIRCLE}:init.sh"], tmp_path) as server, \
            twistd([*common, "-k", CIRCLE, *SHELL], tmp_path, plugin="circles-worker"):
        port = server.wait_listening()
        server.wait_for("FAILED")
        [line] = [line for line in server.lines if "FAILED" in line]
        assert "#error]" in line and "init script init.sh of circle" in line
        assert "FAILED (error): 'exit status 3: no database here'; its output: 'half done'" in line
        assert ws_play(port)["result"] == {"output": "played"}
        assert server.proc.poll() is None


def _run_to_exit(plugin: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, "-n", "--pidfile=", plugin, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("plugin, status, argv, line", [
    ("circles", 1, ["-k", f"{CIRCLE}:missing.rhai"],
     "circles: -k/--circle: cannot read init script missing.rhai: No such file or directory"),
    ("circles", 1, ["-c", f"{CIRCLE}:big.rhai", "--max-script-size", "10"],
     "circles: -k/--circle: init script big.rhai is larger than 10 bytes (--max-script-size)"),
    ("circles-worker", 2, ["-k", f"{CIRCLE}:missing.rhai", *SHELL],
     "circles-worker: -k/--circle: cannot read init script missing.rhai: No such file or directory "
     "(twistd circles-worker --help lists the options)"),
    ("circles", 2, ["--tls"], "circles: --tls needs the certificate to serve: --cert FILE (or --tls-cert FILE)"),
])
def test_an_init_script_or_tls_mistake_is_one_line(tmp_path, plugin, status, argv, line):
    (tmp_path / "big.rhai").write_text("x" * 11)
    result = _run_to_exit(plugin, argv, tmp_path)
    assert result.returncode == status
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(line), result.stderr


# -- the seed's command line ----------------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import sys, time
    from websockets.sync.client import connect
    from tests.support import Key, authenticate, client_tls, request
    circle, ca = sys.argv[1], sys.argv[2]
    deadline = time.monotonic() + 60
    while True:
        try:
            ws = connect(f"wss://localhost:8443/{circle}", ssl=client_tls(ca), open_timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with ws:
        assert ws.socket.version() in ("TLSv1.2", "TLSv1.3"), ws.socket.version()
        refused = request(ws, "play", {"script": "1"})
        assert refused["error"]["code"] == -32001, refused  # --auth: not before authenticating
        assert authenticate(ws, Key())["result"]["authenticated"] is True
        print("served over", ws.socket.version())
""")

SEED = ["--auth", "--tls", "--cert", "cert.pem", "--key", "key.pem"]


def _own_network() -> bool:
    """Whether this machine lets a process have a network namespace of its own (its own port
    8443), as root or through a user namespace."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0


def test_the_seeds_command_line_serves_tls_as_written(tmp_path, tls_files):
    """``twistd -n circles --auth --tls --cert cert.pem --key key.pem``, exactly: no port given, so
    it serves 8443 (the TLS default). Run in a network namespace of its own where the machine
    allows it (8443 is then ours whatever else runs here), else on the machine's 8443."""
    shutil.copy(tls_files["cert"], tmp_path / "cert.pem")
    shutil.copy(tls_files["key"], tmp_path / "key.pem")
    circle = Key().pubkey
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = f'"{TWISTD}" -n --pidfile= --logfile=server.log circles {" ".join(SEED)} & server=$!\n' \
              f'"{sys.executable}" client.py {circle} "{tls_files["ca"]}"; status=$?\n' \
              'kill -TERM $server; wait $server; exit $status\n'
    (tmp_path / "client.py").write_text(CLIENT)
    if _own_network():
        argv = ["unshare", "-rn", "sh", "-c", "ip link set lo up && " + command]
    else:
        argv = ["sh", "-c", command]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    log = (tmp_path / "server.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert result.stdout.startswith("served over TLSv1.")
    assert "starting on 8443" in log and "Traceback" not in log
