"""``--processes N``: CPU per request against one process, and how connections spread.

    .venv/bin/python bench/processes.py                         # whoami, 1 and 2 processes, 3 rounds each
    .venv/bin/python bench/processes.py --processes 1,2,4 --rounds 5 --connections 50,1000
    .venv/bin/python bench/processes.py --play                  # and bench/play.py --processes for each

One server per configuration (``twistd -n circles --processes N``, the flags of bench/run.py's
``ours``), all started first and kept up; the rounds alternate between them (1, 2, 1, 2, ...: a
change in the machine's load falls on each alike). A round is bench/node/loadgen.mjs ``rpc
--method whoami`` (one call in flight per connection) over fresh connections, for each
``--connections`` count. Over the generator's measured window (it marks it on stderr) this
takes from ``/proc`` the CPU time (utime+stime) of every server process, summed, and of the
server's private Redis apart, and counts the connections each process holds (ESTABLISHED on the
port, from ``/proc/PID/fd`` and ``/proc/net/tcp`` through psutil). Nothing is pinned: the
processes, Redis and the generator share the machine's CPUs alike in every configuration.

Reports per configuration the median over rounds of the CPU seconds per 100,000 calls (server,
Redis), calls/s, and per round the connections each process held and how busy each was (CPU
seconds over the window's seconds); with ``--play``, bench/play.py ``--processes N`` once per
round after the whoami rounds, in the same alternation. Writes ``bench/results/processes-<date>.json``.
See docs/benchmarks.md, "--processes: CPU per request and the spread of connections".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.play import cpu_seconds
from bench.run import BIN, NO_CAP, PYTHON, ROOT, choose_generator, free_port, log, machine_info

HERE = Path(__file__).resolve().parent


class Server:
    """``twistd -n circles --processes N`` with its private Redis, as bench/run.py runs ``ours``."""

    def __init__(self, processes: int, logdir: Path, cpus: str | None = None) -> None:
        self.processes = processes
        self.port = free_port()
        self.state = tempfile.mkdtemp(prefix="circles-bench-state-")
        argv = [str(BIN / "twistd"), "-n", "--pidfile=", "circles", "-p", str(self.port), "--interface", "127.0.0.1",
                "--max-nonces", str(NO_CAP), "--rate-limit", "1e9", "--max-connections", "0",
                "--state-dir", self.state, "--processes", str(processes)]
        if cpus:  # every process of the group (and its Redis) inherits the affinity
            argv = ["taskset", "-c", cpus, *argv]
        self.logpath = logdir / f"processes-{processes}-{self.port}.log"
        self.logfile = open(self.logpath, "wb")
        self.process = subprocess.Popen(argv, stdout=self.logfile, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self._wait_serving()

    def _wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.logpath.read_text(errors="replace").count("connected to Redis") < self.processes:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.processes} processes not serving; see {self.logpath}")
            time.sleep(0.1)

    def servers(self) -> list:
        """The server processes, the first one first."""
        first = psutil.Process(self.process.pid)
        return [first, *sorted((c for c in first.children() if "redis-server" not in " ".join(c.cmdline())),
                               key=lambda c: c.pid)]

    def redis(self) -> list:
        return [c for c in psutil.Process(self.process.pid).children() if "redis-server" in " ".join(c.cmdline())]

    def held(self) -> list:
        """The connections each server process holds (ESTABLISHED on the port)."""
        out = []
        for process in self.servers():
            try:
                out.append(sum(1 for c in process.net_connections("tcp")
                               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port))
            except psutil.Error:
                out.append(None)
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.logfile.close()
        shutil.rmtree(self.state, ignore_errors=True)


#: The generator's CPU affinity (``--pin``).
PIN_GENERATOR: list = []


def whoami_round(server: Server, generator, connections: int, seconds: float, warmup: float) -> dict:
    """One measurement: ``connections`` fresh connections calling whoami; CPU of the server
    processes and of Redis over the generator's window, and the connections each process held."""
    servers, redis = server.servers(), server.redis()
    argv = [*PIN_GENERATOR, *generator.command, "rpc", "--url", f"ws://127.0.0.1:{server.port}", "--method", "whoami",
            "--connections", str(connections), "--duration", str(seconds), "--warmup", str(warmup), "--mark-window"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: dict = {}
    last: dict = {}
    held: list = []
    tail: list = []
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        if line.startswith("window start"):
            started = time.monotonic()
            first = {p.pid: cpu_seconds(p.pid) for p in servers + redis}
            held = server.held()  # every connection is open (the generator opened them before its warm-up)
        elif line.startswith("window end"):
            last = {p.pid: cpu_seconds(p.pid) for p in servers + redis}
            wall = time.monotonic() - started
        else:
            tail = (tail + [line])[-20:]
    stdout = proc.stdout.read()
    proc.wait(60)
    if proc.returncode != 0 or not last:
        raise RuntimeError(f"the load generator exited {proc.returncode}: {''.join(tail)[-1000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    calls = result["ops"]

    def used(pid: int) -> float:
        a, b = first.get(pid), last.get(pid)
        return (b - a) if a is not None and b is not None else 0.0

    per_process = [used(p.pid) for p in servers]
    server_cpu, redis_cpu = sum(per_process), sum(used(p.pid) for p in redis)
    return {"processes": server.processes, "connections": connections, "calls": calls,
            "calls_per_s": result["ops_per_s"], "p99_ms": result.get("p99_ms"), "errors": result.get("errors"),
            "server_cpu_s_per_100k": round(server_cpu / max(calls, 1) * 1e5, 3),
            "redis_cpu_s_per_100k": round(redis_cpu / max(calls, 1) * 1e5, 3),
            "held": held, "busy": [round(s / wall, 2) for s in per_process], "wall_s": round(wall, 2)}


def play_round(processes: int, args) -> dict:
    """bench/play.py --processes N: the figures it prints (CPU per play per part)."""
    argv = [PYTHON, "-m", "bench.play", "--processes", str(processes), "--connections", str(args.play_connections),
            "--seconds", str(args.play_seconds), "--generator", args.generator]
    if args.play_rate:
        argv += ["--rate", str(args.play_rate)]
    if args.pin:  # the server processes (and Redis) on CPU 1 as for whoami, the worker on CPU 0
        argv += ["--pin-server", "1", "--pin-workers", "0"]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=str(ROOT), timeout=args.play_seconds + 300)
    if done.returncode != 0:
        raise RuntimeError(f"bench/play.py exited {done.returncode}")
    result = json.loads(done.stdout)
    commands = result.get("redis_commands_per_play") or {}
    return {"processes": processes, "plays_per_s": result["plays_per_s"], "p99_ms": result["p99_ms"],
            "offered_per_s": result.get("rate") or None, "behind": result.get("behind"),
            "cpu_us_per_play": result.get("cpu_us_per_play"),
            # How much each process batches: its wake-ups, and the plays of an ENQUEUE step (each
            # reads ZCOUNT once) and replies of a BLMPOP, per play.
            "server_wakeups_per_play": ((result.get("switches_per_play") or {}).get("server") or {}).get("voluntary"),
            "enqueue_steps_per_play": commands.get("zcount"), "blmpop_per_play": commands.get("blmpop")}


def median(rows: list, field: str) -> float | None:
    values = [r[field] for r in rows if isinstance(r.get(field), (int, float))]
    return round(statistics.median(values), 3) if values else None


def spread(held: list) -> str:
    return "/".join("?" if n is None else str(n) for n in held)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# --processes, {report['date']}", "",
             f"Command: `{report['command']}` at circles {m['git_commit']}" + (" (dirty)" if m["git_dirty"] else ""),
             f"Machine: {m['cpu_model']}, {m['logical_cpus']} CPUs, Linux {m['kernel']}; load average at start "
             f"{m['loadavg_start'][0]:.2f}, at end {report['loadavg_end'][0]:.2f}. "
             f"{'Server on CPU 1, generator on CPU 0.' if report.get('pinned') else 'Nothing pinned.'}", "",
             "| workload | processes | server CPU s per 100k calls (median) | x one process | Redis CPU s per 100k | "
             "calls/s (median) | connections held per process, each round | busy per process, each round |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in report["whoami"].items():
        base = None
        for n in report["configurations"]:
            mine = [r for r in rows if r["processes"] == n]
            cpu = median(mine, "server_cpu_s_per_100k")
            base = cpu if n == report["configurations"][0] else base
            ratio = f"{cpu / base:.2f}" if cpu and base else "n/a"
            lines.append(f"| {key} | {n} | {cpu} | {ratio} | {median(mine, 'redis_cpu_s_per_100k')} | "
                         f"{median(mine, 'calls_per_s'):,.0f} | " + " · ".join(spread(r["held"]) for r in mine)
                         + " | " + " · ".join("/".join(f"{b:.0%}" for b in r["busy"]) for r in mine) + " |")
    if report.get("play"):
        lines += ["", "| play | processes | CPU us per play: server (all processes) | Redis | workers | generator | "
                  "plays/s (offered) | p99 ms | server wake-ups per play | ENQUEUE steps per play | BLMPOP per play |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        servers = {}
        for n in report["configurations"]:
            for r in (r for r in report["play"] if r["processes"] == n):
                cpu = r.get("cpu_us_per_play") or {}
                servers.setdefault(n, []).append(cpu.get("server"))
                offered = f" ({r['offered_per_s']:,.0f}, {r['behind']} behind)" if r.get("offered_per_s") else ""
                lines.append(f"| play | {n} | {cpu.get('server')} | {cpu.get('redis')} | {cpu.get('workers')} | "
                             f"{cpu.get('generator')} | {r['plays_per_s']:,.0f}{offered} | {r['p99_ms']} | "
                             f"{r.get('server_wakeups_per_play')} | {r.get('enqueue_steps_per_play')} | "
                             f"{r.get('blmpop_per_play')} |")
        medians = {n: sorted(v)[len(v) // 2] for n, v in servers.items() if None not in v}
        first = medians.get(report["configurations"][0])
        if first:
            lines += ["", "Server CPU a play, median: " + "; ".join(
                f"{n} process(es) {us} us (x{us / first:.2f})" for n, us in medians.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="configurations, comma-separated (default 1,2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each configuration, alternating")
    parser.add_argument("--connections", default="50,1000", help="whoami connection counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=8, help="the measured window of a whoami round")
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--play", action="store_true", help="also bench/play.py --processes N each round")
    parser.add_argument("--play-connections", type=int, default=50)
    parser.add_argument("--play-seconds", type=float, default=10)
    parser.add_argument("--play-rate", type=float, default=0,
                        help="plays a second in an open loop, the same for every configuration (bench/play.py "
                             "--rate): CPU per play at one load; 0: one play in flight a connection, each "
                             "configuration at its own saturation")
    parser.add_argument("--generator", choices=["node"], default="node", help="the load generator (Node only)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--pin", action="store_true",
                        help="every server process (and its Redis) on CPU 1, the generator (and with --play the worker) on CPU 0, for every "
                             "configuration alike: CPU per call without the generator's core shared")
    args = parser.parse_args(argv)
    global PIN_GENERATOR
    PIN_GENERATOR = ["taskset", "-c", "0"] if args.pin else []
    configurations = [int(n) for n in args.processes.split(",")]
    counts = [int(n) for n in args.connections.split(",")]
    generator = choose_generator(args.generator)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    logdir = Path(tempfile.mkdtemp(prefix="circles-bench-processes-"))
    report: dict = {"date": stamp, "command": shlex.join(["bench/processes.py", *(sys.argv[1:] if argv is None else argv)]),
                    "configurations": configurations, "machine": machine_info(),
                    "generator": {"name": generator.name, "versions": generator.versions},
                    "whoami": {}, "play": [], "server_logs": str(logdir), "pinned": args.pin}
    servers = {}
    try:
        for n in configurations:
            servers[n] = Server(n, logdir, "1" if args.pin else None)
            log(f"{n} process(es): port {servers[n].port}, pids {[p.pid for p in servers[n].servers()]}")
        for count in counts:
            rows = report["whoami"].setdefault(f"whoami x{count}", [])
            for r in range(args.rounds):
                for n in configurations:
                    row = whoami_round(servers[n], generator, count, args.seconds, args.warmup)
                    rows.append(row)
                    log(f"round {r + 1}/{args.rounds} whoami x{count}, {n} process(es): "
                        f"{row['server_cpu_s_per_100k']} s CPU per 100k (Redis {row['redis_cpu_s_per_100k']}), "
                        f"{row['calls_per_s']:,.0f}/s, held {spread(row['held'])}, busy {row['busy']}")
    finally:
        for server in servers.values():
            server.stop()
    if args.play:
        for r in range(args.rounds):
            for n in configurations:
                row = play_round(n, args)
                report["play"].append(row)
                log(f"round {r + 1}/{args.rounds} play, {n} process(es): {row['cpu_us_per_play']}, "
                    f"{row['plays_per_s']:,.0f}/s")
    report["loadavg_end"] = os.getloadavg()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"processes-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / f"processes-{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
