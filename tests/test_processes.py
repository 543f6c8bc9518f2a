"""``--processes N``: N server processes share one port and one Redis, and stop together."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from websockets.sync.client import connect

from .support import Key, request, twistd


def _server_processes(parent_pid: int) -> list:
    parent = psutil.Process(parent_pid)
    children = [c for c in parent.children() if "redis-server" not in " ".join(c.cmdline())]
    return [parent, *children]


def _established(process: psutil.Process, port: int) -> int:
    return sum(1 for c in process.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def test_two_processes_share_the_port_and_redis_and_stop_together(tmp_path):
    circle, user = Key(), Key()
    with twistd(["--auth", "-k", circle.pubkey, "--processes", "2", "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--exec", "sh {script_file}", "-c", "8"], tmp_path,
                   plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("started server process 2")
        worker.wait_for("waiting for tasks")
        deadline = time.monotonic() + 60
        while server.output.count("connected to Redis") < 2:  # each process has its own script runner
            assert time.monotonic() < deadline, server.output
            time.sleep(0.1)
        processes = _server_processes(server.proc.pid)
        assert len(processes) == 2
        clients = [connect(f"ws://127.0.0.1:{port}/{circle.pubkey}").__enter__() for _ in range(40)]
        try:
            time.sleep(0.5)
            held = [_established(p, port) for p in processes]
            assert sum(held) == 40 and all(held), held  # the kernel spread them over both
            for i, ws in enumerate(clients[:10]):  # plays through both processes' script runners
                nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"]
                request(ws, "authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)})
                assert request(ws, "play", {"script": f"echo {i}"})["result"] == {"output": f"{i}"}
        finally:
            for ws in clients:
                ws.close()
        redis = [c for c in psutil.Process(server.proc.pid).children() if "redis-server" in " ".join(c.cmdline())]
        assert len(redis) == 1  # one private Redis, started by the first process
        # SIGTERM to the first process stops them all; twistd exits by re-raising the signal.
        assert server.stop() in (0, -signal.SIGTERM)
    for process in [*processes, *redis]:
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in server.output


@pytest.mark.parametrize("option", ["--listen", "--metrics-listen"])
def test_processes_refuses_listen_strings(tmp_path, option):
    """Every process would bind the endpoint: with --metrics-listen the second one died of
    "Address already in use" (a traceback) and the server ran on with one process."""
    from .support import run_twistd_to_exit
    result = run_twistd_to_exit(["--processes", "2", option, "tcp:0"], tmp_path)
    assert result.returncode != 0 and "--processes" in result.stdout + result.stderr


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("spelling", [["--proc", "2"], ["--processes=2"], ["--processes", "2"]])
def test_processes_never_multiply(tmp_path, spelling):
    """The children get ``--processes`` however it was typed (getopt takes any unique prefix),
    so none of them starts processes of its own: two server processes, not a growing tree."""
    circle = Key()
    seen: list = []
    with twistd(["-k", circle.pubkey, *spelling, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server:
        try:
            server.wait_listening()
            server.wait_for("started server process 2")
            deadline = time.monotonic() + 60
            while server.output.count("connected to Redis") < 2:  # the child is up and serving
                assert time.monotonic() < deadline, server.output
                time.sleep(0.1)
            time.sleep(2)  # a child that spawns does so as soon as it listens, before this
            seen = _descendants(server.proc.pid)
            servers = [p for p in seen if "redis-server" not in " ".join(p.cmdline())]
            assert len(servers) == 1, [p.cmdline() for p in servers]
            assert servers[0].children() == []
            assert server.output.count("started server process") == 1, server.output
            assert "--processes=1" in servers[0].cmdline()
        finally:
            seen += _descendants(server.proc.pid)
            server.stop()
            for process in seen:  # whatever a broken build left behind
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass


def test_child_argv_uses_full_names_and_never_spawns():
    from circles.server_tap import Options, child_argv
    argv = ["-kAB", "--proc", "3", "--auth", "--allowed-o", "https://a,https://b", "-p", "0", "--interface=",
            "--processes=4"]
    assert child_argv(Options(), argv) == ["--circle=AB", "--auth", "--allowed-origins=https://a,https://b",
                                           "--port=0", "--interface=", "--processes=1"]


def test_a_killed_server_process_is_started_again(tmp_path):
    """kill -9 one of the N (the OOM killer's choice): the first process starts another in its
    place, so N serve again, and stopping still leaves nothing."""
    circle = Key()
    seen: list = []
    with twistd(["-k", circle.pubkey, "--processes", "3", "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server:
        try:
            port = server.wait_listening()
            deadline = time.monotonic() + 60
            while server.output.count("connected to Redis") < 3:
                assert time.monotonic() < deadline, server.output
                time.sleep(0.1)
            before = [p for p in _descendants(server.proc.pid) if "redis-server" not in " ".join(p.cmdline())]
            assert len(before) == 2
            before[0].kill()
            while server.output.count("connected to Redis") < 4:  # the new one serves
                assert time.monotonic() < deadline, server.output
                time.sleep(0.1)
            seen = _descendants(server.proc.pid)
            after = [p for p in seen if "redis-server" not in " ".join(p.cmdline())]
            assert len(after) == 2 and before[0] not in after and before[1] in after
            assert server.output.count("started server process") == 3
            assert "server process 2 exited (killed by signal 9) while serving" in server.output \
                or "server process 3 exited (killed by signal 9) while serving" in server.output
            with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
                assert request(ws, "whoami")["result"] is not None
        finally:
            seen += _descendants(server.proc.pid)
            assert server.stop() in (0, -signal.SIGTERM)
    for process in seen:
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE

