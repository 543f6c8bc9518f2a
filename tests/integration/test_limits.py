"""Every limit with a test that fails when the limit does not hold.

Over real loopback sockets against an in-process ``CirclesService`` for what waits out a real
timeout: silent connections, handshake and idle timeouts, pings, backpressure. As an operator
runs it (``twistd -n circles`` + ``circles-worker`` processes, SIGTERM) for shutdown. What is
decided at once (rate, nonce cap, origins, connection counts) is in tests/unit/test_limits.py.

Blocking clients (the ``websockets`` sync client, raw sockets) run in threads so the reactor,
which runs the server in this same process, keeps turning. Waits poll with a deadline; nothing
asserts how fast anything happens, only that it happens within a generous bound.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
import websockets
from twisted.internet import reactor
from websockets.sync.client import connect

from ..play_client import eventually, sleep
from ..support import Key, request, twistd
from ..unit.test_limits import (
    CIRCLE,
    _open_silent,
    _request,
    in_thread,
    open_ws,
    serve,
    whoami,
)


def raw_upgrade(port: int, *, rcvbuf: int = 0, sndbuf: int = 0, extra: str = "") -> socket.socket:
    """A WebSocket opened by hand (blocking): the HTTP upgrade is written here, and nothing
    else happens unless the caller does it, not even answering pings."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /{CIRCLE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{extra}\r\n").encode("ascii"))
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # byte by byte: not a byte of the first frame
        byte = sock.recv(1)
        assert byte, f"closed during the handshake: {response!r}"
        response += byte
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


class Frames:
    """Parses the server's (unmasked, unfragmented) frames out of a byte stream."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 2:
            opcode, length = self._buffer[0] & 0x0F, self._buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(self._buffer) < 4:
                    break
                length, start = struct.unpack("!H", self._buffer[2:4])[0], 4
            elif length == 127:
                if len(self._buffer) < 10:
                    break
                length, start = struct.unpack("!Q", self._buffer[2:10])[0], 10
            if len(self._buffer) < start + length:
                break
            frames.append((opcode, self._buffer[start:start + length]))
            self._buffer = self._buffer[start + length:]
        return frames


def closed_by_peer(sock: socket.socket, timeout: float = 60) -> bool:
    """Read (and discard) until the peer closes; False if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def _all_closed_by_server(socks: list, timeout: float) -> int:
    """Wait until the server has closed every socket; return how many it left open."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_ = len(socks)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            try:
                data = key.fileobj.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            assert not data, f"a silent client was sent {data!r}"
            selector.unregister(key.fileobj)
            open_ -= 1
    selector.close()
    return open_


@pytest_twisted.ensureDeferred
async def test_a_thousand_silent_connections_are_cut_off(start):
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * n + 256  # both ends live in this process
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    # The deadline alone: past --max-pending-per-ip (its own test) a silent crowd from one
    # address is refused with a 503 before the deadline, when it opens fast enough.
    service, port = await serve(start, handshake_timeout=1, max_pending_per_ip=0)
    socks = await in_thread(_open_silent, port, n)
    try:
        assert await in_thread(_all_closed_by_server, socks, 120) == 0
    finally:
        for sock in socks:
            sock.close()
    # and the server still serves
    ws = await in_thread(open_ws, port)
    assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
    await in_thread(ws.close)


def _partial_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /{CIRCLE} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n".encode())
    return sock


def _trickle(port: int, seconds: float) -> bool:
    """Send a request's headers a byte at a time, never finishing; True if the server closed it."""
    sock = _partial_request(port)
    try:
        sock.sendall(b"X-Slow: ")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                return True
            sock.settimeout(0.2)
            try:
                if not sock.recv(4096):
                    return True
            except TimeoutError:
                pass
            except ConnectionResetError:
                return True
        return False
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_partial_http_request_is_closed(start):
    service, port = await serve(start, handshake_timeout=1)
    sock = await in_thread(_partial_request, port)
    try:
        assert await in_thread(closed_by_peer, sock, 60)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_request_trickled_a_byte_at_a_time_is_closed(start):
    """--handshake-timeout bounds the whole request, not the silence between two bytes: a
    client sending one header byte every 0.2 s must not hold a connection forever."""
    service, port = await serve(start, handshake_timeout=1)
    assert await in_thread(_trickle, port, 30)


@pytest_twisted.ensureDeferred
async def test_an_open_websocket_outlives_the_handshake_timeout(start):
    service, port = await serve(start, handshake_timeout=0.5, idle_timeout=0, ping_interval=0)
    ws = await in_thread(open_ws, port)
    try:
        await sleep(2)
        assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
        assert len(service.factory.open_connections) == 1
    finally:
        await in_thread(ws.close)


# --- 4. idle timeout --------------------------------------------------------------------------------


def _close_of(ws) -> websockets.frames.Close:
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        ws.recv(timeout=60)
    return closed.value.rcvd


def _chatty(ws, seconds: float, every: float) -> int:
    deadline = time.monotonic() + seconds
    calls = 0
    while time.monotonic() < deadline:
        assert whoami(ws)["result"]["circle"] == CIRCLE
        calls += 1
        time.sleep(every)
    return calls


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_a_chatty_one_is_not(start):
    service, port = await serve(start, idle_timeout=2, ping_interval=0)
    began = time.monotonic()  # before the server can start the idle connection's timer
    idle, chatty = await in_thread(open_ws, port), await in_thread(open_ws, port)
    try:
        chatter = in_thread(_chatty, chatty, 5, 0.1)
        close = await in_thread(_close_of, idle)
        assert close.code == 1000 and "idle" in close.reason
        assert time.monotonic() - began >= 1.9  # not closed early (a lower bound only: load delays)
        assert await chatter > 5
        assert (await in_thread(whoami, chatty))["result"]["circle"] == CIRCLE  # still open past 2x idle
    finally:
        await in_thread(chatty.close)
        await in_thread(idle.close)


# --- 5. auto-ping -----------------------------------------------------------------------------------


def _ignore_pings(sock: socket.socket, timeout: float) -> list:
    """Read frames without ever answering, until the server drops us; the opcodes seen."""
    frames, opcodes = Frames(), []
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return opcodes + ["eof"]
            opcodes += [opcode for opcode, _ in frames.feed(data)]
    except ConnectionResetError:
        return opcodes + ["eof"]
    except TimeoutError:
        pass
    return opcodes


@pytest_twisted.ensureDeferred
async def test_a_peer_that_never_answers_pings_is_dropped(start):
    service, port = await serve(start, ping_interval=0.5, ping_timeout=0.5, idle_timeout=0)
    mute = await in_thread(raw_upgrade, port)
    polite = await in_thread(open_ws, port)  # the websockets library answers pings itself
    try:
        seen = await in_thread(_ignore_pings, mute, 60)
        assert seen[-1] == "eof", seen
        assert 0x9 in seen  # it was pinged, did not answer, and was dropped for it
        assert seen.count(0x9) <= 2  # dropped at the first unanswered ping's timeout (or about)
        await sleep(2)  # several ping intervals
        assert (await in_thread(whoami, polite))["result"]["circle"] == CIRCLE
        assert len(service.factory.open_connections) == 1
    finally:
        mute.close()
        await in_thread(polite.close)


# --- 7. a reader that stalls: backpressure ----------------------------------------------------------


def buffered_bytes(transport) -> int:
    """Bytes the server has written to ``transport`` that the kernel has not taken yet.

    Twisted has no public API for this. ``FileDescriptor`` keeps them in ``dataBuffer`` (from
    ``offset``) and ``_tempDataBuffer`` (``_tempDataLen`` bytes): private, so the least fragile
    reading is these three names, checked to exist so that a Twisted that renames them fails
    this test loudly instead of measuring 0. The public observable that goes with it is
    ``reactor.getReaders()``: a paused transport is not among them.
    """
    for name in ("dataBuffer", "offset", "_tempDataLen"):
        assert hasattr(transport, name), f"Twisted's FileDescriptor has no {name} any more"
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_no_longer_read(start):
    service, port = await serve(start, rate_limit=0, idle_timeout=0, ping_interval=0)
    slow = await in_thread(raw_upgrade, port, rcvbuf=4096, sndbuf=4096)
    [protocol] = await eventually(lambda: list(service.factory.open_connections))
    server_side = protocol.transport
    assert server_side in reactor.getReaders()
    slow.setblocking(False)

    sent = 0  # requests sent, whole frames only
    pending = b""
    deadline = time.monotonic() + 120
    # Pipeline requests and never read, until every buffer between us is full: our sends have
    # blocked for a while and the server is not reading (it may pause and resume a few times
    # before, while the kernel's buffers grow).
    blocked_since = None
    while True:
        assert time.monotonic() < deadline and sent < 500_000, "the server never stopped reading"
        if not pending:
            pending = b"".join(masked_frame(json.dumps(_request(sent + i)).encode()) for i in range(500))
            sent += 500
        try:
            pending = pending[slow.send(pending):]
            blocked_since = None
        except BlockingIOError:
            if blocked_since is None:
                blocked_since = time.monotonic()
            elif time.monotonic() - blocked_since > 1 and server_side not in reactor.getReaders():
                break
        await sleep(0.001)
    most = buffered_bytes(server_side)
    assert most < 2 * 1024 * 1024

    # Stalled, it stays stalled and bounded; everyone else is served meanwhile.
    other = await in_thread(open_ws, port)
    for _ in range(3):
        assert (await in_thread(whoami, other))["result"]["circle"] == CIRCLE
        assert server_side not in reactor.getReaders()
        most = max(most, buffered_bytes(server_side))
        assert most < 2 * 1024 * 1024
        await sleep(0.2)
    await in_thread(other.close)

    # Once the client reads, the server resumes and answers every request.
    frames, answered = Frames(), set()
    deadline = time.monotonic() + 120
    while len(answered) < sent:
        assert time.monotonic() < deadline, f"{len(answered)} of {sent} answered"
        if pending:
            try:
                pending = pending[slow.send(pending):]
            except BlockingIOError:
                pass
        try:
            data = slow.recv(1 << 20)
        except BlockingIOError:
            await sleep(0.001)
            continue
        assert data, "the server closed the connection"
        for opcode, payload in frames.feed(data):
            assert opcode == 0x1, (opcode, payload)
            reply = json.loads(payload)
            assert reply["result"]["circle"] == CIRCLE
            answered.add(reply["id"])
        await sleep(0)
    assert answered == set(range(sent))
    await eventually(lambda: server_side in reactor.getReaders())  # reading again
    slow.close()


# --- 10. graceful shutdown, as an operator does it --------------------------------------------------


def _redis_pids(state_dir: Path) -> list:
    """Processes whose command line names the state directory's Redis socket."""
    socket_path = str(state_dir / "redis.sock")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if socket_path in cmdline and "redis-server" in cmdline:
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stopped_cleanly(returncode, server) -> None:
    """twistd, after a clean shutdown on a signal, re-raises that signal so its parent sees
    the conventional status (systemd counts SIGTERM as a clean exit): -SIGTERM here, or 0."""
    assert returncode in (0, -signal.SIGTERM), server.output
    assert "Main loop terminated." in server.output and "Server Shut Down." in server.output, server.output
    assert "Traceback" not in server.output, server.output


def _wait(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {predicate}"
        time.sleep(0.05)


SHELL_WORKER = ["--exec", "sh {script_file}"]


def _shutdown_with_a_play_in_flight(tmp_path: Path, grace: float, script: str):
    """Start a server and a worker, put ``script`` in flight, SIGTERM the server. Yields the
    client's messages (replies, then the close) and how the server process ended."""
    circle = Key()
    started = tmp_path / "started"
    with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1",
                 "--shutdown-grace", str(grace)], tmp_path) as server, \
            twistd(["-k", circle.pubkey, *SHELL_WORKER], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        pids = _redis_pids(tmp_path / "circles-state")
        logged = re.search(r"started a private redis-server \(pid (\d+)\)", server.output)
        assert pids and logged and int(logged.group(1)) in pids, server.output
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30, ping_interval=None) as ws:
            ws.send(json.dumps(_request("p", "play", {"script": f"touch {started}; {script}", "timeout": 60})))
            _wait(started.exists)
            server.proc.terminate()  # SIGTERM
            replies = []
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    replies.append(json.loads(ws.recv(timeout=grace + 60)))
        try:  # within the grace period and a generous margin
            returncode = server.proc.wait(grace + 30)
        except subprocess.TimeoutExpired:
            returncode = None
        return replies, closed.value.rcvd, returncode, pids, server


def test_sigterm_lets_the_play_in_flight_finish_then_1001_and_stops_redis(tmp_path):
    replies, close, returncode, pids, server = _shutdown_with_a_play_in_flight(tmp_path, 10, "sleep 2; echo done")
    assert replies == [{"jsonrpc": "2.0", "result": {"output": "done"}, "id": "p"}]
    assert close is not None and close.code == 1001, close
    _stopped_cleanly(returncode, server)
    _wait(lambda: not any(_alive(pid) for pid in pids), 30)
    assert not (tmp_path / "circles-state" / "redis.sock").exists()


def test_sigterm_past_the_grace_answers_minus_32004_then_1001(tmp_path):
    replies, close, returncode, pids, server = _shutdown_with_a_play_in_flight(tmp_path, 1, "sleep 30; echo late")
    assert len(replies) == 1 and replies[0]["id"] == "p", replies
    assert replies[0]["error"]["code"] == -32004, replies
    assert close is not None and close.code == 1001, close
    _stopped_cleanly(returncode, server)
    _wait(lambda: not any(_alive(pid) for pid in pids), 30)


def test_twistd_rate_limit_option_reaches_the_connection(tmp_path):
    circle = Key()
    with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1",
                 "--rate-limit", "0.001", "--rate-burst", "2", "--max-batch", "3"], tmp_path) as server:
        port = server.wait_listening()
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30) as ws:
            ws.send(json.dumps([_request(i) for i in range(4)]))
            assert json.loads(ws.recv(timeout=30))["error"]["code"] == -32006  # over --max-batch
            assert request(ws, "whoami", id_=1)["result"]["circle"] == circle.pubkey
            assert request(ws, "whoami", id_=2)["result"]["circle"] == circle.pubkey
            reply = request(ws, "whoami", id_=3)
            assert reply["error"]["code"] == -32006 and reply["id"] == 3
