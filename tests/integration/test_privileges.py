"""``twistd --uid/--gid``: a server started as root binds its port (443, any under 1024) before
twistd drops privileges, then serves as the user it switched to; what it starts afterwards (the
private Redis, the other ``--processes``) runs as that user and works.

These tests need root (binding under 1024, switching user): CI and the development machine run
as root; elsewhere they are skipped, saying so. Where Python lives under /root, twistd runs in a
mount namespace that lets the user switched to reach it (:data:`ROOT_VIEW`).
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

from ..support import Key, authenticate, eventually_true, request, twistd

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


#: Runs a command in a mount namespace of its own in which /root may be entered: a tmpfs (0755)
#: over /root with each of /root's entries bound into it. Where Python lives under /root (pyenv,
#: as on the development and CI machines), the user switched to could not run it otherwise; the
#: server needs to (it imports modules as it needs them, and starts its children with it). The
#: host's /root is untouched, and the command keeps its pid (unshare and sh exec it).
_ROOT_VIEW = r"""
set -e
view=/mnt  # hidden only in this namespace
[ -d "$view" ] || view=$(mktemp -d)
mount --bind /root "$view"
mount -t tmpfs -o mode=755 tmpfs /root
for entry in "$view"/.[!.]* "$view"/*; do
  [ -e "$entry" ] || continue
  name=/root/$(basename "$entry")
  if [ -d "$entry" ]; then mkdir "$name"; else touch "$name"; fi
  mount --bind "$entry" "$name"
done
exec "$@"
"""
ROOT_VIEW = ("unshare", "--mount", "--propagation", "private", "sh", "-c", _ROOT_VIEW, "sh")


def _nobody_runs_python(prefix: tuple) -> bool:
    """Whether the user switched to may run this Python (and import the server) under ``prefix``."""
    command = [*prefix, "runuser", "-u", NOBODY, "-g", NOGROUP, "--",
               sys.executable, "-c", "import twisted, circles"]
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
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


def _uids(pid: int) -> set[int]:
    return set(psutil.Process(pid).uids())


@pytest.fixture(scope="module")
def prefix() -> tuple:
    """What to run twistd under so that the user it switches to can run its Python: nothing, or
    :data:`ROOT_VIEW` where Python lives under /root."""
    if os.geteuid() != 0:
        pytest.skip("binding a port under 1024 and twistd --uid need root")
    for prefix in ((), ROOT_VIEW):
        if _nobody_runs_python(prefix):
            return prefix
    pytest.skip(f"{NOBODY} cannot run {sys.executable} (it lives where only root may go), and this machine "
                f"does not let root make a mount namespace (unshare --mount) to show it")


def test_a_port_under_1024_is_bound_before_twistd_drops_privileges(nobody_dir, redis_server, prefix):
    circle = Key()
    port = _free_port_under_1024()
    with twistd(["-k", circle.pubkey, "--port", str(port), "--interface", "127.0.0.1",
                 "--redis-url", redis_server.url], nobody_dir,
                options=("--uid", NOBODY, "--gid", NOGROUP), prefix=prefix) as server:
        assert server.wait_listening() == port, server.output
        server.wait_for("connected to Redis")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey
        assert _uids(server.proc.pid) == {65534}, server.output  # real, effective and saved
        assert psutil.Process(server.proc.pid).gids().effective == 65534
    assert "Permission denied" not in server.output


def test_processes_and_the_private_redis_run_as_the_user_switched_to(nobody_dir, prefix):
    circle, user = Key(), Key()
    port = _free_port_under_1024()
    with twistd(["--auth", "-k", circle.pubkey, "--processes", "2", "--port", str(port), "--interface", "127.0.0.1",
                 "--state-dir", os.path.join(nobody_dir, "state")], nobody_dir,
                options=("--uid", NOBODY, "--gid", NOGROUP), prefix=prefix) as server, \
            twistd(["-k", circle.pubkey, "--exec", "sh {script_file}", "--state-dir", os.path.join(nobody_dir, "state")],
                   nobody_dir, plugin="circles-worker", options=("--uid", NOBODY, "--gid", NOGROUP),
                   prefix=prefix) as worker:
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
                assert authenticate(ws, user)["result"]["authenticated"]
                assert request(ws, "play", {"script": f"echo {i}"})["result"] == {"output": f"{i}"}
        finally:
            for ws in clients:
                ws.close()
    assert "Traceback" not in server.output, server.output
