"""File descriptors held by connections that never finish their request.

The server runs as an operator runs it (``twistd -n circles``), under a low descriptor limit
(``prlimit --nofile=256``), and this test opens more silent connections than that. Whatever the
crowd does, a well-behaved client from another address must still get an answer, and the log
must not fill with a line per refused connection.
"""

from __future__ import annotations

import shutil
import socket

import pytest

from ..support import Key, eventually_true, still_open, twistd

NOFILE = 256
CROWD = 400  # silent connections: more than the server has descriptors

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")


def _server(tmp_path, *args):
    return twistd(["-k", Key().pubkey, "--port", "0", "--interface", "127.0.0.1", "--handshake-timeout", "120",
                   *args], tmp_path, prefix=("prlimit", f"--nofile={NOFILE}:{NOFILE}"))


def _open_silent(port: int, n: int) -> list:
    """``n`` connections from 127.0.0.1 that never send a byte."""
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]


def _health(port: int, source: str = "127.0.0.2") -> bytes:
    """``GET /health`` from ``source``: the whole answer, or b"" if the connection was closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    return answer
                answer += data
        except (ConnectionResetError, BrokenPipeError):
            return b""


def _emfile_lines(server) -> list:
    return [line for line in server.lines if "EMFILE" in line]


def test_a_silent_crowd_from_one_address_leaves_room_for_others(tmp_path):
    with _server(tmp_path, "--max-pending-per-ip", "50") as server:
        port = server.wait_listening()
        crowd = _open_silent(port, CROWD)
        try:
            # The server holds 50 of them and refuses the rest at once; others still get in.
            assert eventually_true(lambda: still_open(crowd) == 50)
            assert _health(port).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in crowd:
                sock.close()
        assert eventually_true(lambda: _health(port, "127.0.0.1").startswith(b"HTTP/1.1 200 "))
    assert _emfile_lines(server) == []
    refusals = [line for line in server.lines if "refused a connection" in line]
    assert 1 <= len(refusals) <= 5, refusals  # a few lines with a running count, not one per connection


def test_descriptors_run_short_the_server_refuses_instead_of_failing(tmp_path):
    """No per-address cap (as behind a reverse proxy): the crowd takes what the descriptor
    limit allows less the reserve, every other connection is closed at once, and the server
    serves again as soon as the crowd leaves."""
    with _server(tmp_path, "--max-pending-per-ip", "0", "--fd-reserve", "100") as server:
        port = server.wait_listening()
        crowd = _open_silent(port, CROWD)
        try:
            held = eventually_true(lambda: still_open(crowd) <= NOFILE - 100)
            assert held, "the server held more connections than its descriptors allow"
            assert _health(port) == b""  # refused: closed at once, not left waiting
        finally:
            for sock in crowd:
                sock.close()
        assert eventually_true(lambda: _health(port).startswith(b"HTTP/1.1 200 "))
    assert _emfile_lines(server) == []
    refusals = [line for line in server.lines if "refused a connection" in line]
    assert 1 <= len(refusals) <= 5, refusals
