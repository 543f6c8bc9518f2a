"""examples/embed.tac, the README's embedding example, run as a user runs it (``twistd -ny``)
with a Redis of its own and a worker: a client signs in and plays a script. The README's server
and worker commands likewise, in one directory."""

from __future__ import annotations

import re
import signal

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from ..support import ROOT, Key, authenticate, request, twistd

TAC = ROOT / "examples" / "embed.tac"
TINY_WORKER = ["--engine", "circles.worker.tiny_engine:run"]


def test_the_readme_shows_the_example_as_it_is():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    embedding = readme[readme.index("## Embedding"):readme.index("## Layout")]
    [block] = re.findall(r"```python\n(.*?)```", embedding, re.S)
    assert block == TAC.read_text(encoding="utf-8")


def test_the_embedding_example_serves_a_circle_under_twistd(tmp_path, redis_server, monkeypatch):
    circle, user = Key(), Key()
    monkeypatch.setenv("CIRCLES_REDIS_URL", redis_server.url)  # read by the example and the worker
    monkeypatch.setenv("CIRCLES_PORT", "0")
    monkeypatch.setenv("CIRCLES_CIRCLES", circle.pubkey)
    for name in ("CIRCLES_TLS_CERT", "CIRCLES_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    # twistd -ny examples/embed.tac (here -n -y, with no pid file left behind)
    with twistd([], tmp_path, plugin=str(TAC), options=("-y",)) as app, \
            twistd(["-k", circle.pubkey, *TINY_WORKER], tmp_path, plugin="circles-worker") as worker:
        port = app.wait_listening(60)
        app.wait_for(f"circles is listening on port {port}")
        app.wait_for("connected to Redis")
        assert f"{redis_server.port}" in app.output  # its Redis is the one named, not a private one
        worker.wait_for("waiting for tasks", 60)
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            # authentication is required, as the example says
            assert request(ws, "play", {"script": "1"})["error"]["code"] == -32001
            assert authenticate(ws, user)["result"] == {"authenticated": True, "pubkey": user.pubkey}
            assert request(ws, "play", {"script": "6 * 7"}, id_=2)["result"] == {"output": "42"}
        with pytest.raises(InvalidStatus) as refused:  # only the circle it names
            connect(f"ws://127.0.0.1:{port}/{Key().pubkey}")
        assert refused.value.response.status_code == 404
    # SIGTERM stopped it as a service manager would: twistd exits by that signal once stopped
    assert app.proc.returncode == -signal.SIGTERM, app.output
    assert app.output.rstrip().endswith("Server Shut Down.") and "Traceback" not in app.output, app.output


def _twistd_command(line: str) -> tuple:
    """``twistd [OPTIONS] PLUGIN ARGS...`` as the docs write it: its options, plugin and args."""
    words = line.split()
    at = next(i for i, word in enumerate(words) if word.startswith("circles"))
    return tuple(words[1:at]), words[at], words[at + 1:]


#: twistd's own default, which the test helper turns off: a user's twistd keeps ./twistd.pid.
USERS_PIDFILE = "--pidfile=twistd.pid"


def test_the_worker_the_example_names_plays_with_its_private_redis(tmp_path, monkeypatch):
    """No $CIRCLES_REDIS_URL: the example's private Redis, and a worker started as its comment
    says (in the same directory, no Redis named) serves its circle. Both as a user runs them,
    with twistd's pid file (a second twistd in a directory whose twistd.pid is live refuses to
    start, unless told otherwise)."""
    circle, user = Key(), Key()
    [hint] = re.findall(r"^#\s+(twistd .*circles-worker .*)$", TAC.read_text(encoding="utf-8"), re.M)
    options, plugin, args = _twistd_command(hint.replace("<circle>", circle.pubkey))
    for name in ("CIRCLES_REDIS_URL", "REDIS_URL", "CIRCLES_TLS_CERT", "CIRCLES_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CIRCLES_PORT", "0")
    monkeypatch.setenv("CIRCLES_CIRCLES", circle.pubkey)
    with twistd([], tmp_path, plugin=str(TAC), options=(USERS_PIDFILE, "-y")) as app:
        port = app.wait_listening(60)
        app.wait_for("connected to Redis", 60)
        with twistd(args, tmp_path, plugin=plugin, options=(USERS_PIDFILE, *options)) as worker:
            worker.wait_for("waiting for tasks", 60)
            with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
                assert authenticate(ws, user)["result"] == {"authenticated": True, "pubkey": user.pubkey}
                reply = request(ws, "play", {"script": "6 * 7"}, id_=2)
                assert reply.get("result") == {"output": "42"}, (reply, worker.output)


def test_the_readmes_server_and_worker_in_one_directory_play(tmp_path, monkeypatch):
    """README, "Running scripts": its two commands, in one directory, as a user runs them (with
    twistd's pid file), find each other through the server's private Redis. Only what this machine
    needs is changed: a free port, and the tiny engine for rhai-run (not installed here)."""
    circle, user = Key(), Key()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Running scripts"):]
    server_line, worker_line = (line.split("#")[0].strip() for line in re.findall(r"^    (twistd .*)$", section, re.M)[:2])
    engine = "--exec 'rhai-run {script_file}'"
    assert engine in worker_line, worker_line
    worker_line = worker_line.replace(engine, " ".join(TINY_WORKER))
    for name in ("CIRCLES_REDIS_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    options, plugin, args = _twistd_command(server_line.replace("<pk>", circle.pubkey))
    with twistd([*args, "--port", "0", "--interface", "127.0.0.1"], tmp_path, plugin=plugin,
                options=(USERS_PIDFILE, *options)) as server:
        port = server.wait_listening(60)
        server.wait_for("connected to Redis", 60)
        options, plugin, args = _twistd_command(worker_line.replace("<pk>", circle.pubkey))
        with twistd(args, tmp_path, plugin=plugin, options=(USERS_PIDFILE, *options)) as worker:
            worker.wait_for("waiting for tasks", 60)
            with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
                assert authenticate(ws, user)["result"] == {"authenticated": True, "pubkey": user.pubkey}
                reply = request(ws, "play", {"script": "6 * 7"}, id_=2)
                assert reply.get("result") == {"output": "42"}, (reply, worker.output)
