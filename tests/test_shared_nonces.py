"""Nonces every process sees (issue 23): ``GET /auth/nonce`` on one server process, the WebSocket
with ``?pubkey&sig&nonce`` on any other, single use across all of them; Redis down or full is a
clear 503. Against real redis-servers and a real ``--processes 2`` server."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest
import pytest_twisted
import websockets
from twisted.internet import reactor, threads
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from websockets.sync.client import connect

from circles.auth import NONCE_BYTES, AuthenticationFailed, TooManyNonces, TooManyNoncesForOwner
from circles.backend.redis import parse_redis_url
from circles.backend.scripts import BackendFull, BackendUnavailable
from circles.shared_nonces import RedisNonceStore, nonce_key
from .play_client import eventually
from .redis_server import REDIS_SERVER
from .support import Key, request, twistd
from .test_play_ws import CIRCLE, serve

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def _fetch(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.load(e)


def _whoami(url: str) -> dict:
    with connect(url, open_timeout=30) as ws:
        return request(ws, "whoami")["result"]


def _refused(url: str) -> "tuple[int, str]":
    try:
        with connect(url, open_timeout=30):
            return 101, ""
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code, e.response.reason_phrase


# --- the test: a real --processes 2 server ------------------------------------------


def _served_by(processes: list, port: int) -> list:
    """How many established connections on ``port`` each process holds."""
    return [sum(1 for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            for p in processes]


def test_an_http_nonce_authenticates_a_websocket_on_any_process(tmp_path):
    """Before: 14 of 20 URL authentications failed with 2 processes (the nonce was in the memory
    of whichever process answered GET /auth/nonce, the WebSocket often landed on the other)."""
    circle, user = Key(), Key()
    with twistd(["--auth", "-k", circle.pubkey, "--processes", "2", "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("started server process 2")
        deadline = time.monotonic() + 60
        while server.output.count("connected to Redis") < 2:
            assert time.monotonic() < deadline, server.output
            time.sleep(0.1)
        parent = psutil.Process(server.proc.pid)
        processes = [parent, *(c for c in parent.children() if "redis-server" not in " ".join(c.cmdline()))]
        assert len(processes) == 2
        base = f"127.0.0.1:{port}"
        results, held, urls = [], [], []
        for _ in range(20):
            status, _, body = _fetch(f"http://{base}/auth/nonce?public_key={user.pubkey}")
            assert status == 200, body
            url = (f"ws://{base}/{circle.pubkey}?pubkey={user.pubkey}&sig={user.eth_sign(body['nonce'])}"
                   f"&nonce={body['nonce']}")
            urls.append(url)
            with connect(url, open_timeout=30) as ws:
                held.append(_served_by(processes, port))
                results.append(request(ws, "whoami")["result"])
        assert results == [{"circle": circle.pubkey, "authenticated": True, "pubkey": user.pubkey}] * 20
        # The kernel spread the WebSockets over both processes (each held one at some point).
        assert all(any(h[i] for h in held) for i in range(2)), held
        # Single use across the processes: no URL opens a second time, wherever it lands.
        assert [_refused(url)[0] for url in urls[:6]] == [401] * 6
    assert "Traceback" not in server.output
