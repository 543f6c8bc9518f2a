"""The worker's engines: --exec with real processes, engines through a real worker (--engine with
a Python callable and the options: tests/unit/test_worker_engines.py)."""

from __future__ import annotations

import os
import sys

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from circles.worker.engines import EngineError, ExecEngine, ScriptTimedOut

from ..play_client import eventually, sleep
from ..unit.test_worker_engines import CONTEXT


def engine(**kw) -> ExecEngine:
    return ExecEngine("sh {script_file}", reactor=reactor, **kw)


@pytest_twisted.ensureDeferred
async def test_exec_output_and_environment():
    output = await engine()('echo "$CONTEXT_ID $CALLER_ID $CIRCLES_SOURCE $CIRCLES_TASK_ID"; printf "%s" "$CIRCLES_DATA"',
                            CONTEXT)
    assert output == f"{CONTEXT.circle} {CONTEXT.caller} ws t-1"


@pytest_twisted.ensureDeferred
async def test_exec_script_is_a_file_and_removed():
    path = (await engine()('echo "$0"', CONTEXT)).strip()
    assert path.endswith(".rhai") and not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))  # its directory too


@pytest_twisted.ensureDeferred
async def test_exec_environment_is_an_allow_list(monkeypatch):
    """The worker's own variables stay its own; PATH, LANG, LC_*, TZ and the names given pass."""
    for name, value in {"STRIPE_WEBHOOK_SECRET": "whsec_x", "CIRCLES_REDIS_URL": "redis://:pw@h/0",
                        "LC_TIME": "C", "TZ": "UTC", "EXTRA": "given", "HOME": "/root"}.items():
        monkeypatch.setenv(name, value)
    script = "env | cut -d= -f1 | sort"
    shells_own = {"PWD", "OLDPWD", "SHLVL", "_"}  # what sh sets itself
    names = set((await engine(env_names=["EXTRA"])(script, CONTEXT)).split()) - shells_own
    assert names == {"PATH", "LANG", "LC_TIME", "TZ", "EXTRA", "HOME", "TMPDIR", "CONTEXT_ID", "CALLER_ID",
                     "CIRCLES_SOURCE", "CIRCLES_TASK_ID", "CIRCLES_ATTEMPT"} - ({"LANG"} - set(os.environ))
    assert "EXTRA" not in set((await engine()(script, CONTEXT)).split())


@pytest_twisted.ensureDeferred
async def test_exec_nonzero_exit_carries_stderr():
    with pytest.raises(EngineError) as e:
        await engine()("echo partial; echo 'line 3: x is undefined' >&2; exit 7", CONTEXT)
    assert str(e.value) == "exit status 7: line 3: x is undefined"
    assert e.value.output == "partial"  # what it printed before failing goes with the error


@pytest_twisted.ensureDeferred
async def test_exec_script_killed_by_a_signal_says_which():
    for number in (9, 15):
        with pytest.raises(EngineError) as e:
            await engine()(f"echo dying >&2; kill -{number} $$", CONTEXT)
        assert str(e.value) == f"killed by signal {number}: dying"


@pytest_twisted.ensureDeferred
async def test_exec_output_cap():
    with pytest.raises(EngineError, match="^output too large: more than 1000 bytes$"):
        await engine(max_output=1000)("head -c 100000 /dev/zero; sleep 30", CONTEXT)


@pytest_twisted.ensureDeferred
async def test_exec_output_is_stdout_less_one_final_newline():
    """docs/worker-protocol.md, "A play's output": an interpreter ends every printed line with a
    newline; the output has newlines between lines, none after the last (as the tiny engine)."""
    for script, output in [("echo 20", "20"), ("printf 20", "20"), ("echo a; echo b", "a\nb"),
                           ("printf 'a\\n\\n'", "a\n"), ("echo; echo", "\n"), ("true", ""),
                           ("printf 'a\\r\\n'", "a\r")]:
        assert await engine()(script, CONTEXT) == output, script


@pytest_twisted.ensureDeferred
async def test_exec_output_cap_counts_the_output_not_the_final_newline():
    capped = attrs.evolve(CONTEXT, max_output=5)
    assert await engine()("echo 12345", capped) == "12345"  # 6 bytes of stdout, 5 of output
    with pytest.raises(EngineError, match="^output too large: 6 bytes, the limit is 5$"):
        await engine()("printf 123456", capped)
    with pytest.raises(EngineError, match="^output too large: more than 5 bytes$"):
        await engine()("echo 123456", capped)


@pytest_twisted.ensureDeferred
async def test_exec_timeout_kills_the_process(tmp_path):
    pidfile = tmp_path / "pid"
    d = engine()(f"echo $$ > {pidfile}; echo started >&2; exec sleep 300", CONTEXT)
    pid = int(await eventually(lambda: pidfile.exists() and pidfile.read_text().strip()))
    reactor.callLater(0, d.cancel)  # what the worker's timeout does
    with pytest.raises(ScriptTimedOut, match="script timed out"):
        await d
    await eventually(lambda: gone(pid))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie not reaped yet counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


@pytest_twisted.ensureDeferred
async def test_exec_timeout_ends_what_the_script_started(tmp_path):
    """A background process holding stdout keeps the script running; the timeout ends it too."""
    pidfile = tmp_path / "pid"
    d = engine()(f"sleep 100 & echo $! > {pidfile}", CONTEXT)
    pid = int(await eventually(lambda: pidfile.exists() and pidfile.read_text().strip()))
    await sleep(0.2)
    assert not d.called  # the sleeper holds the output pipe
    d.cancel()
    with pytest.raises(ScriptTimedOut):
        await d
    await eventually(lambda: gone(pid))


@pytest_twisted.ensureDeferred
async def test_exec_ending_ends_what_the_script_left_behind(tmp_path):
    pidfile = tmp_path / "pid"
    output = await engine()(f"sleep 100 >/dev/null 2>&1 & echo $! > {pidfile}; echo done", CONTEXT)
    assert output == "done"
    await eventually(lambda: gone(int(pidfile.read_text())))


@pytest_twisted.ensureDeferred
async def test_exec_output_cap_kills_the_group_and_stops_reading(tmp_path):
    """Endless output from a background process: reading stops at the cap, the group dies. (The
    output starts once the pid is written: a cap reached first would leave the pidfile empty.)"""
    pidfile = tmp_path / "pid"
    with pytest.raises(EngineError, match="^output too large: more than 5000 bytes$"):
        await engine(max_output=100_000)(f"(sleep 0.2; exec yes) & echo $! > {pidfile}; wait",
                                         attrs.evolve(CONTEXT, max_output=5000))
    await eventually(lambda: gone(int(pidfile.read_text())))


@pytest_twisted.ensureDeferred
async def test_exec_command_that_vanished_is_a_clear_error(tmp_path):
    program = tmp_path / "interp"
    program.write_text("#!/bin/sh\nexec sh \"$@\"\n")
    program.chmod(0o755)
    interp = ExecEngine(f"{program} {{script_file}}", reactor=reactor)
    assert await interp("echo ok", CONTEXT) == "ok"
    program.unlink()
    with pytest.raises(EngineError) as e:
        await interp("echo ok", CONTEXT)
    assert str(e.value) == f"exit status 1: cannot start {program}: No such file or directory"


@pytest_twisted.ensureDeferred
async def test_exec_python_interpreter():
    py = ExecEngine(f"{sys.executable} {{script_file}}", reactor=reactor)
    assert await py("import os; print(os.environ['CONTEXT_ID'][:2], 6 * 7)", CONTEXT) == "02 42"


def test_a_killed_worker_leaves_no_script_behind(tmp_path):
    """kill -9 the worker while a script runs (with something it started in the background):
    the script's process group dies with it instead of running on, orphaned."""
    import json
    import time

    from websockets.sync.client import connect

    from ..support import Key, twistd
    circle = Key()
    pids = tmp_path / "pids"
    with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--exec", "sh {script_file}"], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "play",
                                "params": {"script": f"sleep 300 & echo $$ $! > {pids}.new; mv {pids}.new {pids}; wait"}}))
            deadline = time.monotonic() + 60
            while not pids.exists():
                assert time.monotonic() < deadline, worker.output
                time.sleep(0.05)
            script, background = (int(pid) for pid in pids.read_text().split())
            worker.proc.kill()
            worker.proc.wait()
            while not (gone(script) and gone(background)):
                assert time.monotonic() < deadline, "the script outlived its worker"
                time.sleep(0.05)


# -- --prelude rhai: CONTEXT_ID and CALLER_ID as Rhai constants --------------------------------

#: An "interpreter" for --exec that saves the script text it was given, then reports an error on
#: the line holding ``boom`` as a Rhai interpreter would (``line N``), or prints ``ran``.
SAVING_INTERPRETER = """\
import sys
text = open(sys.argv[2], encoding="utf-8").read()
open(sys.argv[1], "w", encoding="utf-8").write(text)
for number, line in enumerate(text.split("\\n"), 1):
    if "boom" in line:
        sys.exit(f"line {number}: boom")
sys.stdout.write("ran")
"""


def saving_interpreter(tmp_path) -> tuple[str, object]:
    """The --exec command running SAVING_INTERPRETER, and the file it saves the script in."""
    program, saved = tmp_path / "interp.py", tmp_path / "received.rhai"
    program.write_text(SAVING_INTERPRETER)
    return f"{sys.executable} {program} {saved} {{script_file}}", saved


def expected_prelude(circle: str, caller: str, source: str, task_id: str) -> str:
    return (f'const CONTEXT_ID = "{circle}"; const CALLER_ID = "{caller}"; '
            f'const CIRCLES_SOURCE = "{source}"; const CIRCLES_TASK_ID = "{task_id}"; ')


@pytest_twisted.ensureDeferred
async def test_exec_rhai_prelude_exact_text(tmp_path):
    command, saved = saving_interpreter(tmp_path)
    rhai = ExecEngine(command, reactor=reactor, prelude="rhai")
    prelude = expected_prelude(CONTEXT.circle, CONTEXT.caller, "ws", "t-1")
    script = 'let x = 10;\nprint(`${CALLER_ID} in ${CONTEXT_ID}`);\nx * 2\n'
    assert await rhai(script, CONTEXT) == "ran"
    assert saved.read_text() == prelude + script
    # A #! line stays first; the prelude starts the next line.
    assert await rhai("#!/usr/bin/env rhai-run\nCALLER_ID", CONTEXT) == "ran"
    assert saved.read_text() == "#!/usr/bin/env rhai-run\n" + prelude + "CALLER_ID"
    assert await rhai("", attrs.evolve(CONTEXT, caller="")) == "ran"  # anonymous: an empty string
    assert saved.read_text() == expected_prelude(CONTEXT.circle, "", "ws", "t-1")
    # Without --prelude the script is as sent.
    assert await ExecEngine(command, reactor=reactor)(script, CONTEXT) == "ran"
    assert saved.read_text() == script


@pytest_twisted.ensureDeferred
async def test_exec_rhai_prelude_keeps_line_numbers(tmp_path):
    command, saved = saving_interpreter(tmp_path)
    script = "let a = 1;\nlet b = 2;\nboom(a, b);\n"
    for prelude in ("none", "rhai"):
        with pytest.raises(EngineError) as e:
            await ExecEngine(command, reactor=reactor, prelude=prelude)(script, CONTEXT)
        assert str(e.value) == "exit status 1: line 3: boom"
    with pytest.raises(EngineError) as e:  # after a #! line too
        await ExecEngine(command, reactor=reactor, prelude="rhai")("#!rhai-run\nboom()", CONTEXT)
    assert str(e.value) == "exit status 1: line 2: boom"


@pytest_twisted.ensureDeferred
async def test_exec_rhai_prelude_escapes_every_value(tmp_path):
    """Hex keys in practice, but whatever the task holds is one Rhai string literal on line 1:
    no quote, backslash, newline or backtick of a value reaches the script as code."""
    from circles.worker.engines import rhai_string
    command, saved = saving_interpreter(tmp_path)
    nasty = attrs.evolve(CONTEXT, caller='x"; print("owned"); let y = "', source="a\nb\\`${z}`\u2028é")
    with pytest.raises(EngineError) as e:
        await ExecEngine(command, reactor=reactor, prelude="rhai")("1;\nboom", nasty)
    assert str(e.value) == "exit status 1: line 2: boom"  # the values added no line
    text = saved.read_text()
    assert text == (f'const CONTEXT_ID = "{CONTEXT.circle}"; '
                    'const CALLER_ID = "x\\U00000022\\U0000003B print\\U00000028\\U00000022owned\\U00000022'
                    '\\U00000029\\U0000003B let y = \\U00000022"; '
                    'const CIRCLES_SOURCE = "a\\U0000000Ab\\U0000005C\\U00000060\\U00000024\\U0000007Bz\\U0000007D'
                    '\\U00000060\\U00002028\\U000000E9"; const CIRCLES_TASK_ID = "t-1"; 1;\nboom')
    assert rhai_string("02ab") == '"02ab"'
    with pytest.raises(EngineError):
        rhai_string("\ud800")


def test_rhai_constants_through_a_real_worker(tmp_path):
    """A real server (--auth) and `twistd circles-worker --exec ... --prelude rhai`: the script
    the interpreter receives declares the circle, the authenticated caller, the source and the
    task id as constants, before the client's script, on its first line."""
    import json
    import re

    from websockets.sync.client import connect

    from ..support import Key, authenticate, request, twistd
    circle, user = Key(), Key()
    command, saved = saving_interpreter(tmp_path)
    with twistd(["--auth", "-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--exec", command, "--prelude", "rhai"], tmp_path,
                   plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert "error" not in authenticate(ws, user)
            reply = request(ws, "play", {"script": "let x = 10;\nx * 2"}, id_=2)
            assert "error" not in reply, reply
            text = saved.read_text()
            match = re.fullmatch(f'const CONTEXT_ID = "{circle.pubkey}"; const CALLER_ID = "{user.pubkey}"; '
                                 'const CIRCLES_SOURCE = "ws"; const CIRCLES_TASK_ID = "([0-9a-f-]{36})"; '
                                 'let x = 10;\nx \\* 2', text)
            assert match, text
            failed = request(ws, "play", {"script": "let x = 10;\nboom(x)"}, id_=3)
            assert json.dumps(failed["error"]).count("line 2: boom") == 1, failed


def test_both_engines_answer_the_output_as_defined(tmp_path):
    """docs/worker-protocol.md, "A play's output", through a real server and real workers: the
    tiny engine (--engine) answers `let x = 10; x * 2` with "20", and an --exec interpreter
    printing lines answers them without the final newline."""
    from websockets.sync.client import connect

    from ..support import Key, request, twistd
    tiny, shell = Key(), Key()
    with twistd(["-k", tiny.pubkey, "-k", shell.pubkey, "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server, \
            twistd(["-k", tiny.pubkey, "--engine", "circles.worker.tiny_engine:run"], tmp_path,
                   plugin="circles-worker") as tiny_worker, \
            twistd(["-k", shell.pubkey, "--exec", "sh {script_file}"], tmp_path, plugin="circles-worker") as sh_worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        tiny_worker.wait_for("waiting for tasks")
        sh_worker.wait_for("waiting for tasks")
        with connect(f"ws://127.0.0.1:{port}/{tiny.pubkey}") as ws:
            for script, output in [("let x = 10; x * 2", "20"), ('print("hello"); 42', "hello\n42"),
                                   ('print("a"); print("b")', "a\nb"), ("let y = 1;", "")]:
                assert request(ws, "play", {"script": script})["result"] == {"output": output}, script
        with connect(f"ws://127.0.0.1:{port}/{shell.pubkey}") as ws:
            for script, output in [("echo 20", "20"), ("echo hello; echo 42", "hello\n42"), ("printf 20", "20")]:
                assert request(ws, "play", {"script": script})["result"] == {"output": output}, script
