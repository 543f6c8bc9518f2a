"""Benchmark ``play`` end to end: server + reference worker + Redis, all on this machine.

    .venv/bin/python -m bench.play [--connections 50] [--seconds 20] [--concurrency 16]
    .venv/bin/python -m bench.play --engine circles.worker.tiny_engine:run --isolation none,process --rounds 3
    .venv/bin/python -m bench.play --generator python    # the asyncio + websockets load generator

Starts ``twistd -n circles --auth`` (with its embedded Redis) and ``twistd -n circles-worker``
with a Python engine that echoes the script (``--engine``: another), opens N connections,
authenticates each (eth personal_sign), then has every connection
play a trivial script (``40 + 2``) in a loop, one request in flight per connection, for a fixed
time. Reports plays/s and latency percentiles as JSON. Loopback only; every loop is bounded by
--seconds. The connections are made by bench/node/loadgen.mjs (Node: ``ws``, ``tiny-secp256k1``)
when node and its npm packages are there, else here with the ``websockets`` client
(``--generator`` chooses, as for bench/run.py).

``--isolation none,process`` compares the worker's ``--isolation`` modes in one run: the same
server, a fresh worker per measurement, the modes taken in turn ``--rounds`` times (interleaved,
so a change in the machine's load falls on both alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import coincurve
import websockets
from eth_account import Account
from eth_account.messages import encode_defunct

from bench.run import choose_generator

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def machine() -> dict:
    model = ""
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


def start(args: list, cwd: str, cpus: str = None) -> subprocess.Popen:
    command = [TWISTD, "-n", "--pidfile=", "--logfile=-", *args]
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        match = re.search(pattern, line)
        if match:
            return match
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"never saw {pattern!r}")


async def connection(url: str, key: coincurve.PrivateKey, until: float, latencies: list, ready: asyncio.Event,
                     go: asyncio.Event) -> None:
    pubkey = key.public_key.format().hex()
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "fetch_nonce", "params": {"pubkey": pubkey}, "id": 0}))
        nonce = json.loads(await ws.recv())["result"]["nonce"]
        signature = Account.from_key(key.secret).sign_message(encode_defunct(text=nonce)).signature.hex()
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "authenticate",
                                  "params": {"pubkey": pubkey, "signature": signature}, "id": 1}))
        assert "result" in json.loads(await ws.recv())
        ready.set()
        await go.wait()
        i = 2
        while time.monotonic() < until:
            started = time.perf_counter()
            await ws.send(f'{{"jsonrpc":"2.0","method":"play","params":{{"script":"40 + 2"}},"id":{i}}}')
            reply = json.loads(await ws.recv())
            if "result" not in reply:
                raise RuntimeError(f"play failed: {reply}")
            latencies.append(time.perf_counter() - started)
            i += 1


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of ``pid`` from /proc, in seconds; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def context_switches(pid: int) -> tuple[int, int] | None:
    """``pid``'s voluntary (it slept: waited for work) and involuntary (preempted) context
    switches from /proc, its main thread's; None once it is gone."""
    try:
        found = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.endswith("ctxt_switches"):
                    found[name] = int(value)
        return found["voluntary_ctxt_switches"], found["nonvoluntary_ctxt_switches"]
    except (OSError, KeyError, ValueError):
        return None


class TreeCPU:
    """CPU time (utime+stime) of a process and all its descendants over a window, sampled every
    quarter second from /proc so that a descendant that ends within the window (an engine child
    replaced) still counts up to its last sample; and their context switches (:meth:`switches`),
    counted the same way."""

    def __init__(self, pids: list, descendants: bool = True) -> None:
        self.roots = list(pids)
        self.descendants = descendants
        self.first: dict = {}
        self.last: dict = {}
        self.first_switches: dict = {}
        self.last_switches: dict = {}
        self._opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree(pid: int) -> list:
        found, todo = [], [pid]
        while todo:
            current = todo.pop()
            found.append(current)
            try:
                with open(f"/proc/{current}/task/{current}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            except OSError:
                pass
        return found

    def _sample(self) -> None:
        for root in self.roots:
            for pid in self._tree(root) if self.descendants else [root]:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    # What ran before the window counts from the first sample; what started
                    # within it, from nothing.
                    self.first.setdefault(pid, 0.0 if self._opened else cpu)
                    self.last[pid] = cpu
                switches = context_switches(pid)
                if switches is not None:
                    self.first_switches.setdefault(pid, (0, 0) if self._opened else switches)
                    self.last_switches[pid] = switches
        self._opened = True

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> float:
        """Seconds of CPU used in the window."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(self.last[pid] - self.first[pid] for pid in self.last)

    def switches(self) -> tuple[int, int]:
        """Voluntary and involuntary context switches in the window (after :meth:`stop`)."""
        return (sum(last[0] - self.first_switches[pid][0] for pid, last in self.last_switches.items()),
                sum(last[1] - self.first_switches[pid][1] for pid, last in self.last_switches.items()))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Meters:
    """CPU of each part over the same window (server, its private Redis, workers, generator), and
    with ``profile_dir`` a py-spy profile of the server and the workers over it."""

    def __init__(self, server_pid: int, worker_pids: list, profile_dir: str = None, seconds: float = 0,
                 redis_socket: str = None) -> None:
        # Under the first server process: its private Redis and the other server processes (--processes).
        below = TreeCPU._tree(server_pid)[1:]
        redis = [pid for pid in below if "redis-server" in _cmdline(pid)]
        servers = [server_pid] + [pid for pid in below if pid not in redis]
        self.parts = {"server": TreeCPU(servers, descendants=False), "redis": TreeCPU(redis),
                      "workers": TreeCPU(worker_pids)}
        self.profiles = []
        self._profile = [(name, pid) for name, pid in [("server", server_pid)] + [
            (f"worker{i}", pid) for i, pid in enumerate(worker_pids)]] if profile_dir else []
        self.profile_dir = profile_dir
        self.seconds = seconds
        self.redis_socket = redis_socket  # the private Redis: its commands over the window, by name
        self.commands: dict = {}

    def _commandstats(self) -> dict:
        import redis

        stats = redis.Redis(unix_socket_path=self.redis_socket).info("commandstats")
        return {name[len("cmdstat_"):]: row["calls"] for name, row in stats.items()}

    def add(self, name: str, meter: TreeCPU) -> None:
        self.parts[name] = meter

    def start(self) -> None:
        if self.redis_socket:
            self.commands = self._commandstats()
        for meter in self.parts.values():
            meter.start()
        for name, pid in self._profile:
            out = os.path.join(self.profile_dir, f"{name}.txt")
            self.profiles.append(subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw", "--nonblocking",
                 "--subprocesses", "--duration", str(max(1, int(self.seconds) - 1)), "--pid", str(pid), "-o", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> dict:
        used = {name: meter.stop() for name, meter in self.parts.items()}
        if self.redis_socket:
            before, after = self.commands, self._commandstats()
            self.commands = {name: calls - before.get(name, 0) for name, calls in after.items()
                             if calls > before.get(name, 0) and name != "info"}
        for proc in self.profiles:
            proc.wait(60)
        return used

    def per_play(self, used: dict, plays: int) -> dict:
        """Microseconds of CPU per play, each part and in all; the workers' own CPU (engine
        children included) is the steadier figure on a shared machine."""
        per = {name: round(seconds / max(plays, 1) * 1e6, 1) for name, seconds in used.items()}
        per["total"] = round(sum(used.values()) / max(plays, 1) * 1e6, 1)
        result = {"worker_cpu_us_per_play": per["workers"], "cpu_us_per_play": per}
        if per.get("generator"):
            # Each part's CPU over the load generator's in the same window: the generator's code is
            # the same whichever checkout runs, so where the machine's speed swings between rounds
            # (a quarter within minutes on a shared VM) this moves less than the microseconds do.
            result["cpu_per_generator_cpu"] = {name: round(us / per["generator"], 2)
                                               for name, us in per.items() if name != "generator"}
        # Wake-ups (voluntary: a process slept for want of work) and preemptions per play, each
        # part: how many plays a process handles each time it wakes, and how often it is cut off.
        result["switches_per_play"] = {
            name: dict(zip(("voluntary", "involuntary"), (round(n / max(plays, 1), 3) for n in meter.switches())))
            for name, meter in self.parts.items()}
        if self.commands:
            # Round trips to Redis per play (every client's: server, workers), by command; an EVALSHA
            # is one Lua step, whatever it does inside.
            result["redis_commands_per_play"] = {name: round(calls / max(plays, 1), 3)
                                                 for name, calls in sorted(self.commands.items())}
        return result


async def load(url: str, connections: int, seconds: float, warmup: float, cpu: Meters = None) -> dict:
    keys = [coincurve.PrivateKey() for _ in range(connections)]
    latencies: list = []
    go = asyncio.Event()
    readies = [asyncio.Event() for _ in keys]
    until = time.monotonic() + 3600
    tasks = [asyncio.create_task(connection(url, k, until, latencies, r, go)) for k, r in zip(keys, readies)]
    await asyncio.gather(*(r.wait() for r in readies))
    go.set()
    await asyncio.sleep(warmup)
    latencies.clear()
    if cpu is not None:
        cpu.add("generator", TreeCPU([os.getpid()], descendants=False))
        cpu.start()
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    measured = list(latencies)
    used = cpu.stop() if cpu is not None else None
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    measured.sort()

    def pct(p: float) -> float:
        return round(measured[min(len(measured) - 1, int(p * len(measured)))] * 1000, 2)

    result = {"connections": connections, "seconds": round(elapsed, 2), "plays": len(measured),
              "plays_per_s": round(len(measured) / elapsed, 1), "p50_ms": pct(0.50), "p90_ms": pct(0.90),
              "p99_ms": pct(0.99)}
    if used is not None:
        result.update(cpu.per_play(used, len(measured)))
    return result


def load_node(command: tuple, base_url: str, circle: str, connections: int, seconds: float, warmup: float,
              cpu: Meters = None, rate: float = 0) -> dict:
    """The same load from bench/node/loadgen.mjs: it says on stderr when its measured window starts
    and ends, and the workers' CPU is taken over that window. ``rate``: plays a second in an open
    loop (0: each connection's next play sent when its last is answered)."""
    proc = subprocess.Popen([*command, "play", "--url", base_url, "--circle", circle, "--connections", str(connections),
                             "--duration", str(seconds), "--warmup", str(warmup), "--rate", str(rate)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if cpu is not None:
        cpu.add("generator", TreeCPU([proc.pid]))
    used = None
    tail: list = []
    try:
        for line in proc.stderr:
            if line.startswith("window start") and cpu is not None:
                cpu.start()
            elif line.startswith("window end") and cpu is not None:
                used = cpu.stop()
            else:
                tail = (tail + [line])[-20:]
        stdout = proc.stdout.read()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the Node load generator exited {proc.returncode}: {''.join(tail)[-1000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    if result.get("errors"):
        raise RuntimeError(f"{result['errors']} plays failed: {result.get('last_error')}")
    for field in ("workload", "errors", "generator"):
        result.pop(field, None)
    if used is not None:
        result.update(cpu.per_play(used, result["plays"]))
    return result


def drain(proc: subprocess.Popen) -> None:
    """Nobody reads the log from here on: drain it so the process never blocks on a full pipe."""
    subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)


def stop(procs: list) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(args, circle: str, state: str, port: int, isolation: str = None) -> dict:
    """Start the workers (with ``--isolation``, if given), put the load on, stop them."""
    workers = []
    try:
        for _ in range(args.workers):
            worker = start(["circles-worker", "-k", circle, "--state-dir", state, "--engine", args.engine,
                            "--concurrency", str(args.concurrency),
                            *(["--isolation", isolation] if isolation else [])], state, args.pin_workers)
            workers.append(worker)
            wait_for(worker, r"waiting for tasks")
        for worker in workers:
            drain(worker)
        cpu = Meters(args.server_pid, [worker.pid for worker in workers], args.profile, args.seconds,
                     os.path.join(state, "redis.sock"))
        if args.generator.name == "node":
            result = load_node(args.generator.command, f"ws://127.0.0.1:{port}", circle, args.connections,
                               args.seconds, args.warmup, cpu, args.rate)
        else:
            result = asyncio.run(load(f"ws://127.0.0.1:{port}/{circle}", args.connections, args.seconds,
                                      args.warmup, cpu))
    finally:
        stop(workers)
    if isolation:
        result["isolation"] = isolation
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="worker --concurrency")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--engine", default="bench.engines:echo", help="worker --engine")
    parser.add_argument("--isolation", default=None,
                        help="worker --isolation modes to compare, comma-separated (e.g. none,process)")
    parser.add_argument("--rounds", type=int, default=1, help="with --isolation: measurements of each mode, in turn")
    parser.add_argument("--generator", choices=["auto", "node", "python"], default="auto",
                        help="load generator: bench/node/loadgen.mjs or this module's (auto: node when it can run)")
    parser.add_argument("--processes", type=int, default=1, help="server --processes (its CPU: all of them)")
    parser.add_argument("--rate", type=float, default=0,
                        help="plays a second, sent in an open loop (Node generator); 0: one in flight a connection")
    parser.add_argument("--pin-server", metavar="CPUS", default=None,
                        help="taskset -c CPUS for the server (and its private Redis, which it starts)")
    parser.add_argument("--pin-workers", metavar="CPUS", default=None,
                        help="taskset -c CPUS for the workers (and their engine children)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="py-spy profiles (collapsed stacks) of the server and workers over the window, into DIR")
    args = parser.parse_args()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    args.generator = choose_generator(args.generator)
    print(f"load generator: {args.generator.name} ({args.generator.why})", file=sys.stderr)
    if args.rate and args.generator.name != "node":
        parser.error("--rate needs the Node generator")
    circle = coincurve.PrivateKey().public_key.format().hex()
    with tempfile.TemporaryDirectory() as state:
        # No per-connection rate limit (as bench/run.py's servers): a connection with one play in
        # flight answered within 5 ms passes the default 200 a second, and a refused play is an error here.
        server = start(["circles", "--auth", "-k", circle, "--port", "0", "--interface", "127.0.0.1",
                        "--rate-limit", "1e9", "--state-dir", state, "--processes", str(args.processes)], state,
                       args.pin_server)
        try:
            args.server_pid = server.pid
            port = int(wait_for(server, r"starting on (\d+)").group(1))
            for _ in range(args.processes):  # each server process connects
                wait_for(server, r"connected to Redis")
            drain(server)
            if args.isolation is None:
                result = measure(args, circle, state, port)
            else:
                modes = args.isolation.split(",")
                runs = [measure(args, circle, state, port, mode) for _ in range(args.rounds) for mode in modes]
                result = {"runs": runs}
                for figure in ("plays_per_s", "worker_cpu_us_per_play"):
                    result[f"median_{figure}"] = {
                        mode: sorted(r[figure] for r in runs if r["isolation"] == mode)[args.rounds // 2]
                        for mode in modes}
        finally:
            stop([server])
    result.update(processes=args.processes, workers=args.workers, worker_concurrency=args.concurrency, engine=args.engine, machine=machine(),
                  generator={"name": args.generator.name, "versions": args.generator.versions})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
