"""``twistd --uid/--gid``: a server started as root binds its port (443, any under 1024) before
twistd drops privileges, then serves as the user it switched to; what it starts afterwards (the
private Redis, the other ``--processes``) runs as that user and works.

These tests need root (binding under 1024, switching user): CI and the development machine run
as root; elsewhere they are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from websockets.sync.client import connect

from .support import Key, eventually_true, request, twistd

NOBODY, NOGROUP = "nobody", "nogroup"



def _free_port_under_1024() -> int:
    for port in range(1000, 600, -1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port between 601 and 1000")


def _interpreter_runs_as_nobody() -> bool:
    """Whether the user switched to may run this Python: the server starts its children (the
    private Redis's wrapper, the other --processes) with it. Not so when the interpreter lives
    under a home only root may enter (pyenv in /root, as on the development machine)."""
    try:
        return subprocess.run([sys.executable, "-c", "import twisted, circles"], user=NOBODY, group=NOGROUP,
                              capture_output=True, timeout=60).returncode == 0
    except (PermissionError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def nobody_dir():
    """A directory the user switched to owns (the service's working and state directory, as
    systemd's WorkingDirectory= gives it); pytest's tmp_path is root's alone (0700)."""
    directory = tempfile.mkdtemp(prefix="circles-uid-", dir="/tmp")
    shutil.chown(directory, NOBODY, NOGROUP)
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _uids(pid: int) -> "set[int]":
    return set(psutil.Process(pid).uids())


@pytest.fixture(autouse=True)
def root_and_a_python_for_nobody():
    if os.geteuid() != 0:
        pytest.skip("binding a port under 1024 and twistd --uid need root")
    if not _interpreter_runs_as_nobody():
        # After switching, the server still imports modules as it needs them (the Redis client's
        # among them) and starts children with this interpreter: it must be nobody's to run.
        pytest.skip(f"{NOBODY} cannot run {sys.executable} (it lives where only root may go: pyenv under "
                    f"/root); a Python installed for every user runs these tests")


def test_a_port_under_1024_is_bound_before_twistd_drops_privileges(nobody_dir, redis_server):
    circle = Key()
    port = _free_port_under_1024()
    with twistd(["-k", circle.pubkey, "--port", str(port), "--interface", "127.0.0.1",
                 "--redis-url", redis_server.url], nobody_dir,
                options=("--uid", NOBODY, "--gid", NOGROUP)) as server:
        assert server.wait_listening() == port, server.output
        server.wait_for("connected to Redis")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey
        assert _uids(server.proc.pid) == {65534}, server.output  # real, effective and saved
        assert psutil.Process(server.proc.pid).gids().effective == 65534
    assert "Permission denied" not in server.output


def test_processes_and_the_private_redis_run_as_the_user_switched_to(nobody_dir):
    circle, user = Key(), Key()
    port = _free_port_under_1024()
    with twistd(["--auth", "-k", circle.pubkey, "--processes", "2", "--port", str(port), "--interface", "127.0.0.1",
                 "--state-dir", os.path.join(nobody_dir, "state")], nobody_dir,
                options=("--uid", NOBODY, "--gid", NOGROUP)) as server, \
            twistd(["-k", circle.pubkey, "--exec", "sh {script_file}", "--state-dir", os.path.join(nobody_dir, "state")],
                   nobody_dir, plugin="circles-worker", options=("--uid", NOBODY, "--gid", NOGROUP)) as worker:
        assert server.wait_listening() == port, server.output
        server.wait_for("started server process 2")
        worker.wait_for("waiting for tasks")
        assert eventually_true(lambda: server.output.count("connected to Redis") >= 2, 60), server.output
        parent = psutil.Process(server.proc.pid)
        children = parent.children()
        redis = [c for c in children if "redis-server" in " ".join(c.cmdline())]
        others = [c for c in children if c not in redis]
        assert len(redis) == 1 and len(others) == 1, server.output
        for process in [parent, *redis, *others]:
            assert set(process.uids()) == {65534}, process.cmdline()
        clients = [connect(f"ws://127.0.0.1:{port}/{circle.pubkey}").__enter__() for _ in range(20)]
        try:
            time.sleep(0.5)
            held = [sum(1 for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED
                        and c.laddr.port == port) for p in (parent, *others)]
            assert sum(held) == 20 and all(held), held  # both processes serve the port
            for i, ws in enumerate(clients[:4]):
                nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"]
                request(ws, "authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)})
                assert request(ws, "play", {"script": f"echo {i}"})["result"] == {"output": f"{i}"}
        finally:
            for ws in clients:
                ws.close()
    assert "Traceback" not in server.output, server.output
