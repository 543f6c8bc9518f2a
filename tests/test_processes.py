"""``--processes N``: N server processes share one port and one Redis, and stop together."""

from __future__ import annotations

import signal
import time

import psutil
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
        while server.output.count("connected to Redis") < 2:  # each process has its own dispatcher
            assert time.monotonic() < deadline, server.output
            time.sleep(0.1)
        processes = _server_processes(server.proc.pid)
        assert len(processes) == 2
        clients = [connect(f"ws://127.0.0.1:{port}/{circle.pubkey}").__enter__() for _ in range(40)]
        try:
            time.sleep(0.5)
            held = [_established(p, port) for p in processes]
            assert sum(held) == 40 and all(held), held  # the kernel spread them over both
            for i, ws in enumerate(clients[:10]):  # plays through both processes' dispatchers
                nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"]
                request(ws, "authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)})
                assert request(ws, "play", {"script": f"echo {i}"})["result"] == {"output": f"{i}\n"}
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


def test_processes_refuses_listen_strings(tmp_path):
    from .support import run_twistd_to_exit
    result = run_twistd_to_exit(["--processes", "2", "--listen", "tcp:0"], tmp_path)
    assert result.returncode != 0 and "--processes" in result.stdout + result.stderr
