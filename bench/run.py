"""Benchmark circles against its two peers on one machine, in one go.

    .venv/bin/python bench/run.py            # full run, 3 interleaved rounds, about 20 minutes
    .venv/bin/python bench/run.py --quick    # a few minutes, small counts: for working on the harness

Each server (ours under ``twistd -n``, the ``websockets`` peer, the bare Autobahn peer) runs
pinned to one CPU with ``taskset``; the load generator to another (where the machine has two
CPUs and ``taskset``; otherwise unpinned, and the report says so). The load generator is
bench/node/loadgen.mjs (Node: ``ws`` and ``tiny-secp256k1``) when node and the npm packages
are there, else bench/loadgen.py (``--generator`` chooses). Measurements are interleaved: for
each workload, round r runs every target in turn, the order rotated from round to round, so
that a change in the machine's load falls on all of them alike; each target's figure is the
median of its rounds, and the ratios ours/websockets and ours/autobahn are printed with the
goals. Every memory workload gets a freshly started server. Writes
``bench/results/<date>.json`` and ``bench/results/<date>.md`` (ratios, tables, machine,
command) and, unless ``--no-profile``, a py-spy profile of our server beside them.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent
NO_CAP = 1_000_000_000  # outstanding nonces per connection during the benchmark (see circles_bench.tac)
TARGETS = ("ours", "autobahn", "websockets")
#: Variants of ours, rpc and auth only, reported against ours: "ours-2p" (--processes 2, unpinned)
#: and "ours-open" (every limit that can be switched off, off: the cost of the limits).
VARIANTS = ("ours-2p", "ours-open")
#: What ours-open switches off (the nonce cap and the connection cap are off for ours too).
LIMITS_OFF = ["--rate-limit", "0", "--idle-timeout", "0", "--ping-interval", "0"]
NODE_LOADGEN = HERE / "node" / "loadgen.mjs"
NODE_PACKAGES = ("ws", "tiny-secp256k1", "@noble/hashes")
#: The goals: ours over each peer, throughput, on the rpc and auth rows.
GOALS = {"websockets": 1.0, "autobahn": 1.2}
PEERS = ("websockets", "autobahn")

PLANS: dict[str, dict[str, Any]] = {
    "full": {"rounds": 3, "rpc_duration": 6.0, "rpc_warmup": 2.0, "auth_duration": 8.0, "auth_warmup": 2.0,
             "auth_concurrency": 20, "idle_count": 10000, "idle_batch": 50, "idle_hold": 3.0,
             "churn_rounds": 10, "churn_per_round": 10000, "churn_concurrency": 50, "settle": 1.0,
             "profile_s": 15},
    "quick": {"rounds": 2, "rpc_duration": 2.0, "rpc_warmup": 0.5, "auth_duration": 2.0, "auth_warmup": 0.5,
              "auth_concurrency": 20, "idle_count": 1000, "idle_batch": 50, "idle_hold": 1.0,
              "churn_rounds": 3, "churn_per_round": 500, "churn_concurrency": 50, "settle": 0.5,
              "profile_s": 4},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Pinning:
    """Where the servers and the load generator run: ``taskset -c CPU`` each, or unpinned."""

    server: str | None
    client: str | None
    note: str

    @property
    def enabled(self) -> bool:
        return self.server is not None

    def server_argv(self, argv: list, target: str = "ours") -> list:
        if not self.enabled or target == "ours-2p":  # two processes: both cores
            return argv
        return ["taskset", "-c", self.server, *argv]

    def client_argv(self, argv: list, target: str = "ours") -> list:
        if not self.enabled or target == "ours-2p":  # shares both cores with the two processes
            return argv
        return ["taskset", "-c", str(self.client), *argv]


def choose_pinning(disabled: bool, affinity: set | None = None, taskset: str | None = "") -> Pinning:
    """Pin the servers to the first CPU this process may use and the generator to the second,
    where there are two and ``taskset``; otherwise run unpinned and say why."""
    if disabled:
        return Pinning(None, None, "Not pinned (--no-pin)")
    if taskset == "":
        taskset = shutil.which("taskset")
    if not taskset:
        return Pinning(None, None, "Not pinned: no taskset (util-linux)")
    cpus = sorted(os.sched_getaffinity(0) if affinity is None else affinity)
    if len(cpus) < 2:
        return Pinning(None, None, f"Not pinned: only CPU {cpus[0]} to run on")
    return Pinning(str(cpus[0]), str(cpus[1]), f"Servers pinned to CPU {cpus[0]}, load generator to CPU {cpus[1]}")


# --- load generators ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Generator:
    """A load generator: the command before the workload's arguments, and what it runs on."""

    name: str  # "node" or "python"
    command: tuple
    versions: dict
    why: str


def node_generator() -> Generator | str:
    """The Node generator if node and its npm packages are there; else why not."""
    node = shutil.which("node")
    if not node:
        return "no node on PATH"
    try:
        done = subprocess.run([node, str(NODE_LOADGEN), "--check"], capture_output=True, text=True, timeout=60,
                              cwd=str(ROOT))
        versions = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        versions = None
    if not versions:
        return "bench/node/loadgen.mjs does not start: run npm ci (scripts/setup --with-npm)"
    missing = [name for name in NODE_PACKAGES if not versions.get(name)]
    if missing:
        return f"npm packages missing ({', '.join(missing)}): run npm ci (scripts/setup --with-npm)"
    return Generator("node", (node, str(NODE_LOADGEN)), versions, "node and its npm packages are there")


def python_generator(why: str) -> Generator:
    return Generator("python", (PYTHON, str(HERE / "loadgen.py")), {"python": platform.python_version()}, why)


def choose_generator(requested: str) -> Generator:
    """``node``, ``python`` or ``auto`` (node when it can run, else python)."""
    if requested == "python":
        return python_generator("--generator python")
    node = node_generator()
    if isinstance(node, Generator):
        return node
    if requested == "node":
        sys.exit(f"--generator node: {node}")
    return python_generator(f"node generator unavailable: {node}")


# --- machine -----------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for dist in ("circles", "twisted", "autobahn", "txaio", "websockets", "coincurve", "pycryptodome", "psutil", "py-spy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        # What runs: the server and the benchmark, not the results of earlier runs.
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "circles", "bench",
                                     ":(exclude)bench/results"], capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"cpu_model": cpu, "logical_cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "mem_total_gb": round(mem_kb / 2**20, 1), "kernel": platform.release(),
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "versions": versions, "git_commit": commit, "git_dirty": dirty,
            "loadavg_start": os.getloadavg()}


# --- servers -----------------------------------------------------------------------------------

class Server:
    """One server process, started pinned, stopped by its own pid."""

    def __init__(self, target: str, logdir: Path, pinning: Pinning, max_nonces: int = NO_CAP) -> None:
        self.target = target
        self.port = free_port()
        env = dict(os.environ)
        if target in ("ours", *VARIANTS):
            # Defaults, except: the nonce cap (workload (1) holds every nonce it fetches), the
            # rate limit (set out of reach, so its check still runs on every request) and the
            # connection limit (workload (3) holds more than the default 10,000).
            self.state = tempfile.mkdtemp(prefix="circles-bench-state-")
            argv = [str(BIN / "twistd"), "-n", "--pidfile=", "circles", "-p", str(self.port),
                    "--interface", "127.0.0.1", "--max-nonces", str(max_nonces), "--rate-limit", "1e9",
                    "--max-connections", "0", "--state-dir", self.state]
            if target == "ours-2p":
                argv += ["--processes", "2"]
            if target == "ours-open":
                argv += LIMITS_OFF
        else:
            script = HERE / "peers" / f"{target}_peer.py"
            argv = [PYTHON, str(script), "--port", str(self.port), "--max-nonces", str(max_nonces)]
        self.logfile = open(logdir / f"{target}-{self.port}.log", "wb")
        self.process = subprocess.Popen(pinning.server_argv(argv, target), stdout=self.logfile,
                                        stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        self.pid = self.process.pid  # taskset execs the server: same pid
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.target} exited with {self.process.returncode}; see {self.logfile.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    time.sleep(0.3)  # let it finish starting (ours logs after binding)
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.target} did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.logfile.close()
        if getattr(self, "state", None):
            shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def loadgen(generator: Generator, server: Server, workload: str, args: list, pinning: Pinning,
            timeout: float) -> dict:
    argv = pinning.client_argv([*generator.command, workload, "--url", server.url, "--server-pid", str(server.pid),
                                *map(str, args)], server.target)
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        return {"workload": workload, "failed": f"load generator still running after {timeout:.0f}s"}
    if done.returncode != 0:
        return {"workload": workload, "failed": f"load generator exited {done.returncode}"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"workload": workload, "failed": "load generator printed no JSON"}


# --- workloads ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Measurement:
    """One row of the report: a workload with its arguments, measured once per target per round."""

    key: str  # "fetch_nonce_x50", "auth_x20", "idle", "churn"
    workload: str  # the load generator's workload
    args: tuple
    timeout: float
    fresh_server: bool  # memory workloads: a server started for this measurement alone


#: The figure a measurement is ranked by (the median round) and which fields add up over rounds.
PRIMARY = {"rpc": "ops_per_s", "auth": "ops_per_s", "idle": "server_bytes_per_idle_conn",
           "churn": "last_over_round1"}
SUMMED = ("errors", "listen_overflows", "open_failures")


def measurements(plan: dict, workloads: set) -> list[Measurement]:
    out = []
    if "rpc" in workloads:
        for method in ("fetch_nonce", "whoami"):
            for connections in (1, 50):
                out.append(Measurement(f"{method}_x{connections}", "rpc", (
                    "--method", method, "--connections", connections, "--duration", plan["rpc_duration"],
                    "--warmup", plan["rpc_warmup"]), plan["rpc_warmup"] + plan["rpc_duration"] + 120, False))
    if "auth" in workloads:
        out.append(Measurement(f"auth_x{plan['auth_concurrency']}", "auth", (
            "--concurrency", plan["auth_concurrency"], "--duration", plan["auth_duration"],
            "--warmup", plan["auth_warmup"]), plan["auth_duration"] + 180, False))
    if "idle" in workloads:
        out.append(Measurement("idle", "idle", (
            "--count", plan["idle_count"], "--batch", plan["idle_batch"], "--hold", plan["idle_hold"],
            "--settle", plan["settle"]), 600, True))
    if "churn" in workloads:
        out.append(Measurement("churn", "churn", (
            "--rounds", plan["churn_rounds"], "--per-round", plan["churn_per_round"],
            "--concurrency", plan["churn_concurrency"], "--settle", plan["settle"]), 900, True))
    return out


def schedule(targets: list, rounds: int) -> list[list]:
    """The order of the targets in each round: rotated by one each round, so that over
    ``len(targets)`` rounds every target runs once in every position (ABC, BCA, CAB)."""
    n = len(targets)
    return [targets[r % n:] + targets[:r % n] for r in range(rounds)] if n else []


def interleave(measures: list[Measurement], targets_for: Callable[[Measurement], list], rounds: int,
               measure: Callable[[str, Measurement, int], dict]) -> dict:
    """Run every measurement ``rounds`` times over its targets, round by round in ``schedule``'s
    order; ``{target: {key: [the rounds' results, in order]}}``."""
    raw: dict = {}
    for m in measures:
        for r, order in enumerate(schedule(targets_for(m), rounds)):
            for target in order:
                raw.setdefault(target, {}).setdefault(m.key, []).append(measure(target, m, r))
    return raw


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def combine(runs: list, primary: str) -> dict:
    """One target's rounds of one measurement as one result: the median round (by ``primary``;
    the lower of the two middle ones for an even count) with every numeric field replaced by
    the median over the rounds (``SUMMED`` fields: the sum); ``by_round`` lists ``primary`` per
    round in the order run (None for a round that failed)."""
    ok = [r for r in runs if _number(r.get(primary))]
    by_round = [r.get(primary) if _number(r.get(primary)) else None for r in runs]
    if not ok:
        reasons = sorted({str(r.get("failed") or r.get("last_error") or f"no {primary}") for r in runs})
        return {"failed": "; ".join(reasons), "by_round": by_round, "rounds_total": len(runs), "rounds_ok": 0}
    ranked = sorted(ok, key=lambda r: r[primary])
    out = dict(ranked[(len(ranked) - 1) // 2])
    for field in list(out):
        values = [r.get(field) for r in ok]
        if not all(_number(v) for v in values):
            continue
        if field in SUMMED:
            out[field] = sum(values)
        else:
            middle = statistics.median(values)
            if all(isinstance(v, int) for v in values) and float(middle).is_integer():
                out[field] = int(middle)  # counts stay counts
            else:
                out[field] = round(middle, 3)
    failed = [r.get("failed") for r in runs if not _number(r.get(primary)) and r.get("failed")]
    if failed:
        out["failed_rounds"] = failed
    out.update(by_round=by_round, rounds_total=len(runs), rounds_ok=len(ok))
    return out


def run_benchmark(targets: list, plan: dict, rounds: int, workloads: set, generator: Generator, pinning: Pinning,
                  logdir: Path) -> tuple[dict, dict]:
    """Every measurement, interleaved; ``(medians, raw)``: ``{target: {key: result}}`` each, the
    raw one with the list of rounds."""
    measures = measurements(plan, workloads)
    throughput = [m for m in measures if not m.fresh_server]
    memory = [m for m in measures if m.fresh_server]
    servers: dict = {}

    def measure(target: str, m: Measurement, r: int) -> dict:
        if m.fresh_server:
            with Server(target, logdir, pinning) as server:
                result = loadgen(generator, server, m.workload, list(m.args), pinning, m.timeout)
        else:
            result = loadgen(generator, servers[target], m.workload, list(m.args), pinning, m.timeout)
        log(f"round {r + 1}/{rounds} {m.key} {target}: " + brief(result))
        return result

    raw: dict = {}
    if throughput:
        try:  # one server per target for all the throughput rounds (idle while the others run)
            for target in targets:
                servers[target] = Server(target, logdir, pinning)
                log(f"{target}: pid {servers[target].pid}, port {servers[target].port}")
            raw = interleave(throughput, lambda m: targets, rounds, measure)
        finally:
            for server in servers.values():
                server.stop()
    if memory:
        plain = [t for t in targets if t not in VARIANTS]
        for target, by_key in interleave(memory, lambda m: plain, rounds, measure).items():
            raw.setdefault(target, {}).update(by_key)
    medians = {t: {m.key: combine(raw[t][m.key], PRIMARY[m.workload]) for m in measures if m.key in raw.get(t, {})}
               for t in targets}
    return medians, raw


def brief(result: dict) -> str:
    """One measurement in a few words, for the progress log."""
    if result.get("failed"):
        return f"FAILED: {result['failed']}"
    if "ops_per_s" in result:
        text = f"{result['ops_per_s']:,.0f}/s, p99 {result.get('p99_ms')} ms"
        if result.get("server_cpu_us_per_op"):
            text += f", {result['server_cpu_us_per_op']} us server CPU per call"
    elif "server_bytes_per_idle_conn" in result:
        text = f"{result['server_bytes_per_idle_conn'] / 1024:.1f} KiB per idle connection"
    elif "last_over_round1" in result:
        text = f"RSS last/first round x{result['last_over_round1']}"
    else:
        text = "done"
    if result.get("errors"):
        text += f", {result['errors']} errors ({result.get('last_error')})"
    return text


# --- profile -----------------------------------------------------------------------------------

def _category(frame: str) -> str:
    path = frame.rsplit("(", 1)[-1]
    for name in ("circles/", "autobahn/", "txaio/", "twisted/", "websockets/", "coincurve/", "Crypto/", "attr/", "json/"):
        if name in path:
            return name.rstrip("/")
    if "python3" in path or "<frozen" in path:
        return "stdlib"
    return "other"


PROFILES = {
    "fetch_nonce_x50": ["rpc", "--connections", "50"],
    "whoami_x50": ["rpc", "--connections", "50", "--method", "whoami"],
    "auth_x20": ["auth", "--concurrency", "20"],
}


def profile_ours(plan: dict, logdir: Path, outdir: Path, stamp: str, pinning: Pinning, generator: Generator,
                 name: str) -> dict:
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if not py_spy:
        return {"skipped": "py-spy not installed (pip install -e '.[bench]')"}
    seconds = plan["profile_s"]
    raw = outdir / f"{stamp}-profile-ours-{name}.txt"
    with Server("ours", logdir, pinning) as server:
        log(f"ours: py-spy for {seconds}s under {name}")
        argv = pinning.client_argv([*generator.command, *PROFILES[name], "--url", server.url,
                                    "--duration", str(seconds + 3), "--warmup", "1", "--server-pid", str(server.pid)])
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(2)
            spy = subprocess.run(pinning.client_argv([py_spy, "record", "--pid", str(server.pid), "--duration",
                                                      str(seconds), "--rate", "200", "--format", "raw", "--function",
                                                      "--output", str(raw)]),
                                 capture_output=True, text=True, timeout=seconds + 60)
        finally:
            stdout, _ = load.communicate(timeout=seconds + 120)
    if spy.returncode != 0 or not raw.exists():
        return {"skipped": f"py-spy failed: {spy.stderr.strip()[-300:]}"}
    load_result = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    return summarise_profile(raw, load_result)


def summarise_profile(raw: Path, load_result: dict) -> dict:
    self_counts: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    categories: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf = frames[-1]
        self_counts[leaf] += n
        categories[_category(leaf)] += n
        for frame in set(frames):
            inclusive[frame] += n
    pct = lambda n: round(100 * n / max(1, total), 1)  # noqa: E731
    ours_inclusive = [(f, pct(n)) for f, n in inclusive.most_common() if "circles/" in f.rsplit("(", 1)[-1]]
    return {"samples": total, "raw": raw.name, "load": load_result,
            "self_by_package_pct": {k: pct(v) for k, v in categories.most_common()},
            "top_self": [(f, pct(n)) for f, n in self_counts.most_common(25)],
            "circles_inclusive": ours_inclusive[:25],
            "top_inclusive": [(f, pct(n)) for f, n in inclusive.most_common(40)]}


# --- report ------------------------------------------------------------------------------------

ROWS = [("fetch_nonce_x1", "fetch_nonce, 1 connection", "calls/s"),
        ("fetch_nonce_x50", "fetch_nonce, 50 connections", "calls/s"),
        ("whoami_x1", "whoami, 1 connection", "calls/s"),
        ("whoami_x50", "whoami, 50 connections", "calls/s")]


def ratios(results: dict, goals: dict = GOALS) -> dict:
    """Per throughput row: ``ours/PEER`` (median calls/s of ours over the peer's), whether it
    meets the goal, the same ratio round by round (round r of ours over round r of the peer, run
    back to back), and ``cpu PEER/ours`` (the peer's server CPU per call over ours)."""
    out: dict = {}
    ours = results.get("ours", {})
    for key in [r[0] for r in ROWS] + sorted(k for k in ours if k.startswith("auth_x")):
        mine = ours.get(key, {})
        for peer in PEERS:
            theirs = results.get(peer, {}).get(key, {})
            if mine.get("ops_per_s") and theirs.get("ops_per_s"):
                exact = mine["ops_per_s"] / theirs["ops_per_s"]
                meets = exact >= goals[peer]  # the ratio itself, not its rounding: 0.998 is short of 1.0
                ratio = round(exact, 2)
                if not meets and ratio >= goals[peer]:
                    ratio = math.floor(exact * 100) / 100  # printed below the goal it misses
                row = out.setdefault(key, {})
                row[f"ours/{peer}"] = ratio
                row[f"goal ours/{peer}"] = goals[peer]
                row[f"meets ours/{peer}"] = meets
                pairs = zip(mine.get("by_round") or [], theirs.get("by_round") or [])
                row[f"ours/{peer} by round"] = [round(a / b, 2) if a and b else None for a, b in pairs]
            if mine.get("server_cpu_us_per_op") and theirs.get("server_cpu_us_per_op"):
                out.setdefault(key, {})[f"cpu {peer}/ours"] = round(theirs["server_cpu_us_per_op"]
                                                                    / mine["server_cpu_us_per_op"], 2)
    return out


def ratio_mark(row: dict, peer: str) -> str:
    """``1.07 ✓`` or ``0.93 ✗`` against the goal; ``n/a`` without both figures."""
    if f"ours/{peer}" not in row:
        return "n/a"
    return f"{row[f'ours/{peer}']} {'✓' if row[f'meets ours/{peer}'] else '✗'}"


def ratio_lines(report: dict) -> list:
    """The ratios table that heads the report (and is printed at the end of a run)."""
    rat, results = report["ratios"], report["results"]
    peers = [p for p in PEERS if p in results]
    if "ours" not in results or not peers:
        return []
    labels = {key: label for key, label, _ in ROWS}
    lines = [f"## Ratios: ours over each peer, median of {report['rounds']} interleaved round(s)", "",
             "| workload | " + " | ".join(f"ours/{p} (goal >= {GOALS[p]})" for p in peers)
             + " | " + " | ".join(f"round by round, ours/{p}" for p in peers) + " |",
             "|" + "---|" * (1 + 2 * len(peers))]
    for key in [r[0] for r in ROWS] + sorted(k for k in rat if k.startswith("auth_x")):
        if key not in rat:
            continue
        label = labels.get(key) or f"auth handshakes, {key.split('_x')[1]} concurrent"
        rounds = [" ".join("n/a" if v is None else str(v) for v in rat[key].get(f"ours/{p} by round", [])) or "n/a"
                  for p in peers]
        lines.append(f"| {label} | " + " | ".join(ratio_mark(rat[key], p) for p in peers) + " | "
                     + " | ".join(rounds) + " |")
    lines += ["", "✓: meets the goal; ✗: below it. Throughput ratios; the server CPU per call of each is in "
              "the table below.", ""]
    return lines


def memory_lines(results: dict, targets: list) -> list:
    """The memory table: idle connections and churn, per target."""
    lines = ["## Memory", "", "| | " + " | ".join(targets) + " |", "|" + "---|" * (len(targets) + 1)]

    def mem_row(label, fn):
        vals = []
        for t in targets:
            try:
                vals.append(fn(results[t]))
            except (KeyError, TypeError):
                vals.append("n/a")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    mem_row("idle connections held (alive after hold / target)",
            lambda r: f"{r['idle']['alive_after_hold']:,} / {r['idle']['target']:,}")
    mem_row("server RSS before / with all open (MB)",
            lambda r: f"{r['idle']['server_rss_before_mb']} / {r['idle']['server_rss_open_mb']}")
    mem_row("server RSS per idle connection", lambda r: f"{r['idle']['server_bytes_per_idle_conn'] / 1024:.1f} KiB")
    mem_row("... after one call on each", lambda r: f"{r['idle']['server_bytes_per_conn_after_call'] / 1024:.1f} KiB")
    mem_row("connects/s while opening", lambda r: f"{r['idle']['connects_per_s']:,.0f}")
    mem_row("churn: RSS after round 1 / last (MB)",
            lambda r: f"{r['churn']['server_rss_round1_mb']} / {r['churn']['server_rss_last_mb']} "
                      f"(x{r['churn']['last_over_round1']}, {r['churn']['rounds']}x{r['churn']['per_round']:,})")
    mem_row("churn: connect+call+close per s (mean)",
            lambda r: f"{sum(x['connects_per_s'] for x in r['churn']['per_round_results']) / len(r['churn']['per_round_results']):,.0f}")
    mem_row("churn errors", lambda r: str(r["churn"]["errors"]))
    mem_row("listen overflows during idle / churn (0 expected)",
            lambda r: f"{r['idle'].get('listen_overflows')} / {r['churn'].get('listen_overflows')}")
    return lines


def markdown(report: dict) -> str:
    results, m = report["results"], report["machine"]
    targets = [t for t in TARGETS if t in results]
    gen = report["generator"]
    lines = [f"# circles benchmark, {report['date']} ({report['mode']} mode)", "",
             f"Command: `{report['command']}` at circles {m['git_commit']}" + (" (dirty)" if m["git_dirty"] else "")
             + f"; {report['rounds']} interleaved round(s) per measurement, the order of the targets rotated "
             "from round to round; each figure is the median of its rounds.", "",
             f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['mem_total_gb']} GB, "
             f"Linux {m['kernel']}, {m['implementation']} {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + f". Load average at start {m['loadavg_start'][0]:.2f}, at end {report['loadavg_end'][0]:.2f}"
             + (" (a busy machine: read the ratios, not the rates)" if busy(report) else "")
             + f". {report['pinning']}.", "",
             f"Load generator: {gen['name']} (" + ", ".join(f"{k} {v}" for k, v in gen["versions"].items())
             + f"; {gen['why']}).", ""]
    lines += ratio_lines(report)
    auth_keys = sorted({k for t in targets for k in results[t] if k.startswith("auth_x")})
    rows = ROWS + [(k, f"auth handshakes, {k.split('_x')[1]} concurrent", "handshakes/s") for k in auth_keys]
    header = "| workload | " + " | ".join(targets) + " | ours/autobahn | ours/websockets |"
    lines += ["## Throughput (higher is better); p50 / p99 latency in ms; server CPU-us per call", "",
              header, "|" + "---|" * (len(targets) + 3)]
    rat = report["ratios"]
    for key, label, unit in rows:
        cells = []
        for t in targets:
            r = results[t].get(key)
            if not r or "ops_per_s" not in r:
                cells.append("n/a")
                continue
            cell = f"**{r['ops_per_s']:,.0f}** {unit}<br>{r.get('p50_ms')} / {r.get('p99_ms')} ms"
            if r.get("server_cpu_us_per_op"):
                cell += f"<br>{r['server_cpu_us_per_op']} us CPU, {r['server_cpu_util'] * 100:.0f}% busy"
            if r.get("others_on_server_cpu") is not None:
                cell += f", others {r['others_on_server_cpu'] * 100:.0f}%"
            if r.get("client_cpu_util") is not None:
                cell += f"<br>load generator {r['client_cpu_util'] * 100:.0f}% busy"
            if r.get("errors"):
                cell += f"<br>{r['errors']} errors"
            if len(r.get("by_round") or []) > 1:
                cell += "<br>rounds: " + " · ".join("failed" if v is None else f"{v:,.0f}" for v in r["by_round"])
            cells.append(cell)
        ra = rat.get(key, {})
        ratio_cells = [f"{ratio_mark(ra, peer)}<br>(CPU {ra.get(f'cpu {peer}/ours', 'n/a')})"
                       for peer in ("autobahn", "websockets")]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratio_cells) + " |")
    failed = [(t, k, r["failed"]) for t in targets for k, r in results[t].items() if r.get("failed")]
    if failed:
        lines += [""] + [f"- **{t} {k} failed:** {why}" for t, k, why in failed]
    lines += ["", f"Goal: ours/autobahn >= {GOALS['autobahn']} and ours/websockets >= {GOALS['websockets']}.",
              "Each ratio is throughput, ours over the peer; under it, in brackets, the peer's server CPU per "
              "call over ours (above 1: ours does the same work with less CPU). When the load generator is "
              "near 100% busy the throughput ratio measures the generator as much as the servers, and the "
              "CPU ratio is the one to read.", ""]
    variants = [v for v in VARIANTS if v in results]
    if variants and "ours" in results:
        titles = {"ours-2p": "2 processes (both CPUs)", "ours-open": "limits off (" + " ".join(LIMITS_OFF) + ")"}
        lines += ["## Variants of ours, same run", "", "| workload | ours | " + " | ".join(titles[v] for v in variants)
                  + " |", "|" + "---|" * (len(variants) + 2)]
        for key, label, unit in rows:
            base = results["ours"].get(key) or {}
            cells = [f"{base['ops_per_s']:,.0f} {unit}, {base.get('server_cpu_us_per_op')} us CPU" if base.get("ops_per_s") else "n/a"]
            for v in variants:
                r = results[v].get(key) or {}
                if not r.get("ops_per_s") or not base.get("ops_per_s"):
                    cells.append("n/a")
                    continue
                cells.append(f"{r['ops_per_s']:,.0f} {unit} (x{r['ops_per_s'] / base['ops_per_s']:.2f})"
                             + (f", {r['server_cpu_us_per_op']} us CPU" if v != "ours-2p" else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(key in results[t] for t in targets for key in ("idle", "churn")):
        lines += memory_lines(results, targets)
    for name, prof in (report.get("profile") or {}).items():
        if "samples" not in prof:
            lines += ["", f"## py-spy: ours under {name}: {prof.get('skipped')}"]
            continue
        lines += ["", f"## py-spy: ours under {name} ({prof['samples']} samples at 200 Hz, active time only)", "",
                  "Self time by package: " + ", ".join(f"{k} {v}%" for k, v in prof["self_by_package_pct"].items()), "",
                  "| circles function (inclusive) | % |", "|---|---|"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["circles_inclusive"][:15]]
        lines += ["", "| top self frames | % |", "|---|---|"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["top_self"][:15]]
    return "\n".join(lines) + "\n"


def busy(report: dict) -> bool:
    """Whether the machine had other work when the run started (one-minute load average 0.5 or
    more; at the end the run's own processes count in it)."""
    return report["machine"]["loadavg_start"][0] >= 0.5


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds and small counts, for development")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: ours,autobahn,websockets,ours-2p,ours-open")
    parser.add_argument("--workloads", default="rpc,auth,idle,churn", help="comma-separated: rpc,auth,idle,churn")
    parser.add_argument("--generator", choices=["auto", "node", "python"], default="auto",
                        help="load generator: bench/node/loadgen.mjs or bench/loadgen.py (auto: node when it can run)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per measurement (default 3; 2 with --quick); figures are medians")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of ours")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    rounds = plan["rounds"] if args.rounds is None else args.rounds
    if rounds < 1:
        parser.error("--rounds must be 1 or more")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in (*TARGETS, *VARIANTS)]
    if unknown or not targets:
        parser.error(f"--targets: unknown {unknown}; choose from {', '.join((*TARGETS, *VARIANTS))}")
    workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    if not workloads or workloads - set(PRIMARY):
        parser.error(f"--workloads: choose from {', '.join(PRIMARY)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by servers and load generator
    pinning = choose_pinning(args.no_pin)
    generator = choose_generator(args.generator)
    log(f"load generator: {generator.name} ({generator.why}); {pinning.note}")
    outdir = Path(args.out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S") + ("-quick" if args.quick else "")
    logdir = Path(tempfile.mkdtemp(prefix="circles-bench-"))
    started = time.monotonic()
    command = shlex.join(["bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    report: dict[str, Any] = {
        "date": stamp, "mode": mode, "plan": plan, "rounds": rounds, "command": command,
        "pinned": pinning.enabled, "pinning": pinning.note, "nofile": hard,
        "generator": {"name": generator.name, "versions": generator.versions, "why": generator.why},
        "machine": machine_info(), "server_logs": str(logdir)}
    log(f"{mode} run, targets {targets}, {rounds} interleaved round(s), server logs in {logdir}")
    report["results"], report["raw"] = run_benchmark(targets, plan, rounds, workloads, generator, pinning, logdir)
    if not args.no_profile and "ours" in targets:
        report["profile"] = {name: profile_ours(plan, logdir, outdir, stamp, pinning, generator, name)
                             for name in PROFILES}
    report["loadavg_end"] = os.getloadavg()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["ratios"] = ratios(report["results"])
    (outdir / f"{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (outdir / f"{stamp}.md").write_text(text)
    print(text)
    log(f"done in {report['elapsed_s']}s: {outdir / (stamp + '.json')} and .md")


if __name__ == "__main__":
    main()
