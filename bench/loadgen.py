"""Load generator for the circles benchmark (asyncio + the ``websockets`` client).

One workload per run; the result is one JSON object on stdout, a human summary on stderr::

    python bench/loadgen.py rpc   --url ws://127.0.0.1:8080 --connections 50 --duration 10
    python bench/loadgen.py auth  --url ws://127.0.0.1:8080 --concurrency 20 --duration 10
    python bench/loadgen.py idle  --url ws://127.0.0.1:8080 --count 10000 --server-pid PID
    python bench/loadgen.py churn --url ws://127.0.0.1:8080 --rounds 10 --per-round 10000 --server-pid PID

Workloads:

* ``rpc``: ``fetch_nonce`` calls on N open connections, each with one request in flight at a
  time (send, wait for the reply, send the next). Calls/s and p50/p99 latency over a fixed
  duration after a warm-up.
* ``auth``: full authentication handshakes by C concurrent clients in a loop: connect,
  ``fetch_nonce``, sign the nonce (Ethereum ``personal_sign`` with a key generated up front:
  keccak256 + coincurve's recoverable signing, ~50 us on the client), ``authenticate``, close
  (with the closing handshake). Handshakes/s and p50/p99 of a whole handshake.
* ``idle``: opens ``count`` connections in batches and holds them; checks they still answer;
  server RSS (``/proc/<pid>/status`` VmRSS) before and after, per connection.
* ``churn``: ``rounds`` rounds of ``per-round`` connections, each connect, ``fetch_nonce`` (so
  per-session state is created), close; server RSS after every round, last vs first.

With ``--server-pid`` every workload also reports the server's CPU time over the measured
window (utime+stime from ``/proc/<pid>/stat``): CPU-us per call is steadier than calls/s on a
shared machine, and a server below ~95% CPU at 50 connections means the load generator, not
the server, is the limit. ``--procs P`` splits ``rpc``/``auth`` load over P processes.

Clients connect without permessage-deflate, without client-side pings and without proxies,
and spread their source addresses over 127.0.0.2-127.0.0.63 so that tens of thousands of
connects do not run out of ephemeral ports on one address pair.

``rpc`` and ``auth`` run on :class:`RawClient` unless ``--client websockets``: a minimal
RFC 6455 client on an asyncio protocol (masked text frames with an all-zero key, which the
server unmasks like any other; close handshake; the server closes TCP first). With the
``websockets`` client the generator spends as much CPU per handshake as the servers it
measures, so on a two-core machine it, not the server, set the handshake rate.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import resource
import sys
import time
from typing import Any

import coincurve
from Crypto.Hash import keccak
from websockets.asyncio.client import connect

CLK_TCK = os.sysconf("SC_CLK_TCK")
SOURCE_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 64)]
_source = itertools.cycle(SOURCE_ADDRESSES)
_ETH_PREFIX = b"\x19Ethereum Signed Message:\n"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLIENT = "raw"  # rpc and auth: "raw" (RawClient) or "websockets"; set by --client


# --- helpers ---------------------------------------------------------------------------------

def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(pid: int | None) -> int | None:
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    if not pid:
        return None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def listen_overflows() -> int | None:
    """The kernel's TcpExt ListenOverflows counter (machine-wide): connects dropped at a full backlog."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return None


def percentile(sorted_values: list, q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def latency_summary(latencies: list) -> dict:
    values = sorted(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {"p50_ms": ms(percentile(values, 50)), "p90_ms": ms(percentile(values, 90)),
            "p99_ms": ms(percentile(values, 99)), "max_ms": ms(values[-1] if values else None)}


def new_circle() -> str:
    return coincurve.PrivateKey().public_key.format(compressed=True).hex()


async def open_ws(base_url: str, circle: str, spread: bool = True, timeout: float = 30.0):
    kwargs = {"local_addr": (next(_source), 0)} if spread else {}
    return await connect(f"{base_url}/{circle}", compression=None, proxy=None, ping_interval=None,
                         open_timeout=timeout, close_timeout=10, max_queue=None, **kwargs)


def cpu_busy_seconds(cpus: set) -> float:
    """Busy time (all but idle and iowait) of the given CPUs from /proc/stat, in seconds."""
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *ticks = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = list(map(int, ticks))
                busy += sum(values[:8]) - values[3] - values[4]
    return busy / CLK_TCK


class Window:
    """Wall time and CPU time (server, this process, the server's CPUs) over a measured window."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.server_cpus: set = set()
        if server_pid:
            try:
                self.server_cpus = os.sched_getaffinity(server_pid)
            except OSError:
                pass

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.server0 = cpu_seconds(self.server_pid)
        self.busy0 = cpu_busy_seconds(self.server_cpus)

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        server = cpu_seconds(self.server_pid)
        out = {"wall_s": round(wall, 3), "client_cpu_s": round(time.process_time() - self.cpu0, 3)}
        if server is not None:
            out["server_cpu_s"] = round(server - self.server0, 3)
            if self.server_cpus:
                # What else ran on the server's CPU(s): other processes take it from the server.
                others = cpu_busy_seconds(self.server_cpus) - self.busy0 - (server - self.server0)
                out["others_on_server_cpu"] = round(max(0.0, others) / (wall * len(self.server_cpus)), 3)
        return out


async def _monitor(t_measure: float, t_end: float, server_pid: int | None, out: dict) -> None:
    """Take CPU times of this process and of the server over [t_measure, t_end]."""
    await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
    window = Window(server_pid)
    window.start()
    await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
    out.update(window.stop())


# --- the raw client ----------------------------------------------------------------------------

class RawClient(asyncio.Protocol):
    """Just enough of a WebSocket client for rpc and auth: ``send(text)``, ``recv()``, ``close()``."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection lost"))

    async def _more(self) -> None:
        if self.lost.done():
            raise ConnectionError("connection lost")
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    async def handshake(self, host: str, path: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                             "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._more()
        head = bytes(self.buffer[:end])
        del self.buffer[:end + 4]
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if not head.startswith(b"HTTP/1.1 101") or accept.encode() not in head:
            raise ConnectionError(f"handshake refused: {head[:80]!r}")

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        return header + b"\0\0\0\0" + payload  # masked with a zero key: the payload as is

    async def _read_frame(self) -> tuple:
        while True:
            buf = self.buffer
            if len(buf) >= 2:
                n, start = buf[1] & 0x7F, 2
                if n == 126:
                    n, start = (int.from_bytes(buf[2:4], "big"), 4) if len(buf) >= 4 else (None, 0)
                elif n == 127:
                    n, start = (int.from_bytes(buf[2:10], "big"), 10) if len(buf) >= 10 else (None, 0)
                if n is not None and len(buf) >= start + n:
                    opcode, payload = buf[0] & 0x0F, bytes(buf[start:start + n])
                    del buf[:start + n]
                    return opcode, payload
            await self._more()

    async def send(self, text: str) -> None:
        self.transport.write(self._frame(0x1, text.encode()))

    async def recv(self) -> str:
        opcode, payload = await self._read_frame()
        if opcode != 0x1:
            raise ConnectionError(f"expected a text frame, got opcode {opcode}")
        return payload.decode()

    async def close(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(self._frame(0x8, (1000).to_bytes(2, "big")))
        try:
            while (await asyncio.wait_for(self._read_frame(), 10))[0] != 0x8:
                pass
            await asyncio.wait_for(self.lost, 10)  # the server closes TCP first
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.transport.close()


async def open_raw(base_url: str, circle: str, spread: bool = True, timeout: float = 30.0) -> RawClient:
    host_port = base_url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    kwargs = {"local_addr": (next(_source), 0)} if spread else {}
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(loop.create_connection(RawClient, host, int(port), **kwargs), timeout)
    await asyncio.wait_for(client.handshake(host_port, f"/{circle}"), timeout)
    return client


def open_client(base_url: str, circle: str, spread: bool = True):
    """A connection for rpc/auth with the client chosen by ``--client``."""
    return (open_raw if CLIENT == "raw" else open_ws)(base_url, circle, spread)


# --- workload: rpc -----------------------------------------------------------------------------

async def _rpc(url: str, connections: int, duration: float, warmup: float, barrier=None,
               server_pid: int | None = None, method: str = "fetch_nonce") -> dict:
    circle = new_circle()
    pubkey = coincurve.PrivateKey().public_key.format(compressed=True).hex()
    sockets = [await open_client(url, circle, spread=False) for _ in range(connections)]
    if barrier is not None:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
    latencies: list = []
    state = {"measuring": False, "calls": 0, "errors": 0}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    if method == "fetch_nonce":
        prefix = '{"jsonrpc":"2.0","method":"fetch_nonce","params":{"pubkey":"' + pubkey + '"},"id":'
        expect = '"nonce":"'
    else:
        prefix = '{"jsonrpc":"2.0","method":"' + method + '","id":'
        expect = '"result":'

    async def worker(ws) -> None:
        perf = time.perf_counter
        record = latencies.append
        n = 0
        while True:
            t0 = perf()
            if t0 >= t_end:
                return
            n += 1
            await ws.send(prefix + str(n) + "}")
            reply = await ws.recv()
            t1 = perf()
            if expect not in reply:
                state["errors"] += 1
            if t0 >= t_measure:
                record(t1 - t0)

    window: dict = {}
    await asyncio.wait_for(asyncio.gather(_monitor(t_measure, t_end, server_pid, window),
                                          *(worker(ws) for ws in sockets)), warmup + duration + 30)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"latencies": latencies, "errors": state["errors"], "window": window}


# --- workload: auth ----------------------------------------------------------------------------

def sign_personal(key: coincurve.PrivateKey, message: bytes) -> str:
    digest = keccak.new(digest_bits=256, data=_ETH_PREFIX + str(len(message)).encode() + message).digest()
    return key.sign_recoverable(digest, hasher=None).hex()  # r||s||v, v in {0, 1}


async def _auth(url: str, concurrency: int, duration: float, warmup: float, barrier=None,
                server_pid: int | None = None) -> dict:
    circle = new_circle()
    keys = [coincurve.PrivateKey() for _ in range(concurrency)]
    if barrier is not None:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
    latencies: list = []
    state = {"errors": 0, "sign_s": 0.0, "signs": 0, "last_error": None}
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + duration

    async def worker(key: coincurve.PrivateKey) -> None:
        perf = time.perf_counter
        pubkey = key.public_key.format(compressed=True).hex()
        fetch = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "fetch_nonce", "params": {"pubkey": pubkey}})
        while True:
            t0 = perf()
            if t0 >= t_end:
                return
            try:
                ws = await open_client(url, circle)
                try:
                    await ws.send(fetch)
                    nonce = json.loads(await ws.recv())["result"]["nonce"]
                    s0 = perf()
                    signature = sign_personal(key, nonce.encode())
                    state["sign_s"] += perf() - s0
                    state["signs"] += 1
                    await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "authenticate",
                                              "params": {"pubkey": pubkey, "signature": signature}}))
                    reply = json.loads(await ws.recv())
                    if not reply.get("result", {}).get("authenticated"):
                        raise RuntimeError(f"not authenticated: {reply}")
                finally:
                    await ws.close()
            except Exception as e:  # counted and reported; the loop goes on until t_end
                state["errors"] += 1
                state["last_error"] = f"{type(e).__name__}: {e}"[:300]
                await asyncio.sleep(0.01)
                continue
            if t0 >= t_measure:
                latencies.append(perf() - t0)

    window: dict = {}
    await asyncio.wait_for(asyncio.gather(_monitor(t_measure, t_end, server_pid, window),
                                          *(worker(k) for k in keys)), warmup + duration + 60)
    return {"latencies": latencies, "errors": state["errors"], "last_error": state["last_error"], "window": window,
            "client_sign_us": round(state["sign_s"] / max(1, state["signs"]) * 1e6, 1)}


# --- running rpc/auth over one or more processes --------------------------------------------------

def _child(kind: str, kwargs: dict, barrier, queue) -> None:  # one load generator process
    raise_nofile()
    fn = _rpc if kind == "rpc" else _auth
    try:
        result = asyncio.run(fn(barrier=barrier, **kwargs))
    except Exception as e:
        result = {"latencies": [], "errors": 1, "last_error": f"{type(e).__name__}: {e}", "window": {}}
    queue.put(result)


def run_throughput(kind: str, url: str, parallel: int, duration: float, warmup: float,
                   procs: int, server_pid: int | None, method: str = "fetch_nonce") -> dict:
    """rpc or auth with ``parallel`` connections/clients split over ``procs`` processes.

    Rates, latencies and CPU times all cover the same measured window (after the warm-up).
    """
    shares = [parallel // procs + (1 if i < parallel % procs else 0) for i in range(procs)]
    shares = [s for s in shares if s]
    param = "connections" if kind == "rpc" else "concurrency"
    fn = _rpc if kind == "rpc" else _auth
    extra = {"method": method} if kind == "rpc" else {}
    if len(shares) == 1:
        parts = [asyncio.run(fn(url, shares[0], duration, warmup, server_pid=server_pid, **extra))]
    else:
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(len(shares))
        queue = ctx.Queue()
        children = [ctx.Process(target=_child, args=(kind, {"url": url, param: n, "duration": duration,
                                                             "warmup": warmup, **extra,
                                                             "server_pid": server_pid if i == 0 else None},
                                                       barrier, queue))
                    for i, n in enumerate(shares)]
        for child in children:
            child.start()
        parts = [queue.get(timeout=warmup + duration + 180) for _ in children]
        for child in children:
            child.join(10)
    latencies = [v for p in parts for v in p["latencies"]]
    out: dict[str, Any] = {
        "workload": kind, **extra, "client": CLIENT, param: parallel, "procs": len(shares), "duration_s": duration, "warmup_s": warmup,
        "ops": len(latencies), "ops_per_s": round(len(latencies) / duration, 1),
        "errors": sum(p["errors"] for p in parts), **latency_summary(latencies),
    }
    last_errors = [p.get("last_error") for p in parts if p.get("last_error")]
    if last_errors:
        out["last_error"] = last_errors[-1]
    if kind == "auth":
        signs = [p["client_sign_us"] for p in parts if "client_sign_us" in p]
        out["client_sign_us"] = round(sum(signs) / max(1, len(signs)), 1)
    windows = [p.get("window") or {} for p in parts]
    wall = windows[0].get("wall_s") or duration
    if "server_cpu_s" in windows[0]:
        server_cpu = windows[0]["server_cpu_s"]
        out["server_cpu_util"] = round(server_cpu / wall, 3)
        if "others_on_server_cpu" in windows[0]:
            out["others_on_server_cpu"] = windows[0]["others_on_server_cpu"]
        if latencies:
            out["server_cpu_us_per_op"] = round(server_cpu / len(latencies) * 1e6, 1)
    out["client_cpu_util"] = round(sum(w.get("client_cpu_s", 0.0) for w in windows) / wall, 3)
    return out


# --- workload: idle ----------------------------------------------------------------------------

async def _open_many(url: str, circle: str, count: int, batch: int) -> tuple[list, int, list]:
    opened: list = []
    failures = 0
    errors: list = []
    for start in range(0, count, batch):
        n = min(batch, count - start)
        results = await asyncio.gather(*(open_ws(url, circle) for _ in range(n)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                failures += 1
                if len(errors) < 3:
                    errors.append(f"{type(r).__name__}: {r}"[:200])
            else:
                opened.append(r)
    return opened, failures, errors


async def _ask_all(sockets: list, method: str = "whoami") -> int:
    """Send one request on every socket (in chunks); the number that answered."""
    async def ask(ws) -> bool:
        try:
            await ws.send('{"jsonrpc":"2.0","id":1,"method":"' + method + '"}')
            return '"result"' in await asyncio.wait_for(ws.recv(), 30)
        except Exception:
            return False
    ok = 0
    for start in range(0, len(sockets), 1000):
        ok += sum(await asyncio.gather(*(ask(ws) for ws in sockets[start:start + 1000])))
    return ok


async def _close_all(sockets: list, batch: int) -> None:
    for start in range(0, len(sockets), batch):
        await asyncio.gather(*(ws.close() for ws in sockets[start:start + batch]), return_exceptions=True)


async def _idle(url: str, count: int, batch: int, hold: float, server_pid: int | None, settle: float) -> dict:
    circle = new_circle()
    warm, _, _ = await _open_many(url, circle, min(batch, 100), batch)  # warm the server's code paths
    await _ask_all(warm)
    await _close_all(warm, batch)
    await asyncio.sleep(settle)
    rss_before = rss_bytes(server_pid)
    t0 = time.perf_counter()
    sockets, failures, errors = await _open_many(url, circle, count, batch)
    open_s = time.perf_counter() - t0
    await asyncio.sleep(settle)
    rss_open = rss_bytes(server_pid)
    await asyncio.sleep(hold)
    alive = await _ask_all(sockets)  # every held connection must still answer after the hold
    rss_used = rss_bytes(server_pid)
    t1 = time.perf_counter()
    await _close_all(sockets, batch)
    close_s = time.perf_counter() - t1
    del sockets
    await asyncio.sleep(settle)
    rss_closed = rss_bytes(server_pid)
    out = {"workload": "idle", "target": count, "batch": batch, "opened": count - failures,
           "open_failures": failures, "open_s": round(open_s, 2),
           "connects_per_s": round((count - failures) / open_s, 1), "hold_s": hold,
           "alive_after_hold": alive, "close_s": round(close_s, 2)}
    if errors:
        out["first_errors"] = errors
    if rss_before is not None:
        held = max(1, count - failures)
        out.update({"server_rss_before_mb": round(rss_before / 2**20, 1),
                    "server_rss_open_mb": round(rss_open / 2**20, 1),
                    "server_rss_after_one_call_mb": round(rss_used / 2**20, 1),
                    "server_rss_after_close_mb": round(rss_closed / 2**20, 1),
                    "server_bytes_per_idle_conn": round((rss_open - rss_before) / held),
                    "server_bytes_per_conn_after_call": round((rss_used - rss_before) / held)})
    return out


# --- workload: churn ---------------------------------------------------------------------------

async def _churn(url: str, rounds: int, per_round: int, concurrency: int, server_pid: int | None,
                 settle: float) -> dict:
    circle = new_circle()
    pubkey = new_circle()
    request = '{"jsonrpc":"2.0","id":1,"method":"fetch_nonce","params":{"pubkey":"' + pubkey + '"}}'
    per_round_out = []
    errors = 0
    last_error = None
    rss0 = rss_bytes(server_pid)
    for round_no in range(1, rounds + 1):
        remaining = [per_round]
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal errors, last_error
            while remaining[0] > 0:  # noqa: B023  (the round's workers end within the round)
                remaining[0] -= 1  # noqa: B023
                try:
                    ws = await open_ws(url, circle)
                    try:
                        await ws.send(request)
                        if '"nonce"' not in await ws.recv():
                            raise RuntimeError("no nonce in reply")
                    finally:
                        await ws.close()
                except Exception as e:
                    errors += 1
                    last_error = f"{type(e).__name__}: {e}"[:200]

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 600)
        wall = time.perf_counter() - t0
        await asyncio.sleep(settle)
        rss = rss_bytes(server_pid)
        per_round_out.append({"round": round_no, "wall_s": round(wall, 2),
                              "connects_per_s": round(per_round / wall, 1),
                              "server_rss_mb": None if rss is None else round(rss / 2**20, 1)})
        print(f"  churn round {round_no}: {per_round / wall:.0f} conn/s, rss "
              f"{per_round_out[-1]['server_rss_mb']} MB", file=sys.stderr)
    out: dict[str, Any] = {"workload": "churn", "rounds": rounds, "per_round": per_round,
                           "concurrency": concurrency, "errors": errors, "per_round_results": per_round_out}
    if last_error:
        out["last_error"] = last_error
    if rss0 is not None:
        first, last = per_round_out[0]["server_rss_mb"], per_round_out[-1]["server_rss_mb"]
        out.update({"server_rss_start_mb": round(rss0 / 2**20, 1), "server_rss_round1_mb": first,
                    "server_rss_last_mb": last, "last_over_round1": round(last / first, 3),
                    "growth_after_round1_mb": round(last - first, 1),
                    "growth_bytes_per_conn_after_round1": round((last - first) * 2**20 / max(1, (rounds - 1) * per_round), 1)})
    return out


# --- command line ------------------------------------------------------------------------------

def summary(result: dict) -> str:
    kind = result["workload"]
    if kind in ("rpc", "auth"):
        what = f"{result['method']} calls/s" if kind == "rpc" else "handshakes/s"
        par = result.get("connections", result.get("concurrency"))
        line = (f"{kind} x{par}: {result['ops_per_s']:.0f} {what}, p50 {result['p50_ms']} ms, "
                f"p99 {result['p99_ms']} ms, errors {result['errors']}")
        if "server_cpu_util" in result:
            line += f", server CPU {result['server_cpu_util'] * 100:.0f}%"
        if "others_on_server_cpu" in result:
            line += f" (others on its CPU {result['others_on_server_cpu'] * 100:.0f}%)"
        return line + f", client CPU {result['client_cpu_util'] * 100:.0f}%"
    if kind == "idle":
        return (f"idle: {result['opened']}/{result['target']} held, {result['alive_after_hold']} alive after hold, "
                f"{result.get('server_bytes_per_idle_conn', '?')} B/conn server RSS")
    return (f"churn: {result['rounds']}x{result['per_round']}, rss round1 {result.get('server_rss_round1_mb')} MB, "
            f"last {result.get('server_rss_last_mb')} MB (x{result.get('last_over_round1')}), errors {result['errors']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="circles benchmark load generator")
    parser.add_argument("workload", choices=["rpc", "auth", "idle", "churn"])
    parser.add_argument("--url", required=True, help="ws://host:port (the circle path is added)")
    parser.add_argument("--server-pid", type=int, help="server process, for RSS and CPU time")
    parser.add_argument("--connections", type=int, default=1, help="rpc: open connections")
    parser.add_argument("--method", default="fetch_nonce", choices=["fetch_nonce", "whoami"], help="rpc: method called")
    parser.add_argument("--concurrency", type=int, default=20, help="auth/churn: concurrent clients")
    parser.add_argument("--duration", type=float, default=10.0, help="rpc/auth: measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="rpc/auth: seconds before measuring")
    parser.add_argument("--procs", type=int, default=1, help="rpc/auth: load generator processes")
    parser.add_argument("--count", type=int, default=10000, help="idle: connections to hold")
    parser.add_argument("--batch", type=int, default=50, help="idle: connections opened at once")
    parser.add_argument("--hold", type=float, default=5.0, help="idle: seconds to hold them")
    parser.add_argument("--rounds", type=int, default=10, help="churn: rounds")
    parser.add_argument("--per-round", type=int, default=10000, help="churn: connections per round")
    parser.add_argument("--settle", type=float, default=1.0, help="idle/churn: seconds before reading RSS")
    parser.add_argument("--client", choices=["raw", "websockets"], default="raw",
                        help="rpc/auth: the minimal RawClient or the websockets library's client")
    args = parser.parse_args(argv)
    global CLIENT
    CLIENT = args.client
    nofile = raise_nofile()
    url = args.url.rstrip("/")
    overflows = listen_overflows()
    if args.workload in ("rpc", "auth"):
        parallel = args.connections if args.workload == "rpc" else args.concurrency
        result = run_throughput(args.workload, url, parallel, args.duration, args.warmup, args.procs,
                                args.server_pid, args.method)
    elif args.workload == "idle":
        if args.count + 100 > nofile:
            parser.error(f"--count {args.count} needs more file descriptors than RLIMIT_NOFILE {nofile}")
        result = asyncio.run(_idle(url, args.count, args.batch, args.hold, args.server_pid, args.settle))
    else:
        result = asyncio.run(_churn(url, args.rounds, args.per_round, args.concurrency, args.server_pid, args.settle))
    if overflows is not None:
        # Non-zero: connects waited for SYN retransmits (1 s, 3 s...) because the server's
        # accept backlog was full; the rates above then measure the backlog, not the server.
        result["listen_overflows"] = listen_overflows() - overflows
    print(summary(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    gc.freeze()
    print(json.dumps(main()))
