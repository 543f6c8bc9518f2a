"""Benchmark circles against its two peers on one machine, in one go.

    .venv/bin/python bench/run.py            # full run, about 10 minutes
    .venv/bin/python bench/run.py --quick    # a minute, small counts: for working on the harness

Each server (ours under ``twistd -n``, the ``websockets`` peer, the bare Autobahn peer) runs
pinned to CPU 0 with ``taskset -c 0``; the load generator (bench/loadgen.py) is pinned to
CPU 1. Every memory workload gets a freshly started server. Writes
``bench/results/<date>.json`` and ``bench/results/<date>.md`` (table, ratios, machine) and,
unless ``--no-profile``, a py-spy profile of our server under workload (1) beside them.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

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
SERVER_CPU = "0"
CLIENT_CPU = "1"

PLANS = {
    "full": {"rpc_duration": 6.0, "rpc_warmup": 2.0, "auth_duration": 8.0, "auth_warmup": 2.0,
             "auth_concurrency": 20, "idle_count": 10000, "idle_batch": 50, "idle_hold": 3.0,
             "churn_rounds": 10, "churn_per_round": 10000, "churn_concurrency": 50, "settle": 1.0,
             "profile_s": 15},
    "quick": {"rpc_duration": 2.0, "rpc_warmup": 0.5, "auth_duration": 2.0, "auth_warmup": 0.5,
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


def pin(cpu: str, argv: list, enabled: bool) -> list:
    return ["taskset", "-c", cpu, *argv] if enabled else argv


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
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "circles", "bench"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
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

    def __init__(self, target: str, logdir: Path, pinned: bool, max_nonces: int = NO_CAP) -> None:
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
                pinned = False  # two processes: both cores
            if target == "ours-open":
                argv += LIMITS_OFF
        else:
            script = HERE / "peers" / f"{target}_peer.py"
            argv = [PYTHON, str(script), "--port", str(self.port), "--max-nonces", str(max_nonces)]
        self.logfile = open(logdir / f"{target}-{self.port}.log", "wb")
        self.process = subprocess.Popen(pin(SERVER_CPU, argv, pinned), stdout=self.logfile,
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


def loadgen(server: Server, workload: str, args: list, pinned: bool, timeout: float) -> dict:
    argv = pin(CLIENT_CPU, [PYTHON, str(HERE / "loadgen.py"), workload, "--url", server.url,
                            "--server-pid", str(server.pid), *map(str, args)], pinned)
    done = subprocess.run(argv, stdout=subprocess.PIPE, timeout=timeout, text=True)
    if done.returncode != 0:
        return {"workload": workload, "failed": f"loadgen exited {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- workloads ---------------------------------------------------------------------------------

def run_target(target: str, plan: dict, logdir: Path, pinned: bool, workloads: set) -> dict:
    out: dict = {}
    if target in VARIANTS:
        workloads = workloads & {"rpc", "auth"}
    if target == "ours-2p":  # throughput over both cores; the load generator shares them
        pinned = False
    if workloads & {"rpc", "auth"}:
        with Server(target, logdir, pinned) as server:
            log(f"{target}: throughput workloads (pid {server.pid}, port {server.port})")
            t = plan["rpc_warmup"] + plan["rpc_duration"] + 120
            if "rpc" in workloads:
                for method in ("fetch_nonce", "whoami"):
                    for connections in (1, 50):
                        out[f"{method}_x{connections}"] = loadgen(server, "rpc", [
                            "--method", method, "--connections", connections,
                            "--duration", plan["rpc_duration"], "--warmup", plan["rpc_warmup"]], pinned, t)
            if "auth" in workloads:
                out[f"auth_x{plan['auth_concurrency']}"] = loadgen(server, "auth", [
                    "--concurrency", plan["auth_concurrency"], "--duration", plan["auth_duration"],
                    "--warmup", plan["auth_warmup"]], pinned, plan["auth_duration"] + 180)
    if "idle" in workloads:
        with Server(target, logdir, pinned) as server:
            log(f"{target}: idle connections (fresh server, pid {server.pid})")
            out["idle"] = loadgen(server, "idle", ["--count", plan["idle_count"], "--batch", plan["idle_batch"],
                                                   "--hold", plan["idle_hold"], "--settle", plan["settle"]],
                                  pinned, 600)
    if "churn" in workloads:
        with Server(target, logdir, pinned) as server:
            log(f"{target}: connect/disconnect churn (fresh server, pid {server.pid})")
            out["churn"] = loadgen(server, "churn", [
                "--rounds", plan["churn_rounds"], "--per-round", plan["churn_per_round"],
                "--concurrency", plan["churn_concurrency"], "--settle", plan["settle"]], pinned, 900)
    return out


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
    "auth_x20": ["auth", "--concurrency", "20"],
}


def profile_ours(plan: dict, logdir: Path, outdir: Path, stamp: str, pinned: bool, name: str) -> dict:
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if not py_spy:
        return {"skipped": "py-spy not installed (pip install -e '.[bench]')"}
    seconds = plan["profile_s"]
    raw = outdir / f"{stamp}-profile-ours-{name}.txt"
    with Server("ours", logdir, pinned) as server:
        log(f"ours: py-spy for {seconds}s under {name}")
        argv = pin(CLIENT_CPU, [PYTHON, str(HERE / "loadgen.py"), *PROFILES[name], "--url", server.url,
                                "--duration", str(seconds + 3), "--warmup", "1", "--server-pid", str(server.pid)], pinned)
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(2)
            spy = subprocess.run(pin(CLIENT_CPU, [py_spy, "record", "--pid", str(server.pid), "--duration", str(seconds),
                                                  "--rate", "200", "--format", "raw", "--function", "--output", str(raw)],
                                     pinned), capture_output=True, text=True, timeout=seconds + 60)
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


def ratios(results: dict) -> dict:
    out = {}
    ours = results.get("ours", {})
    for key in [r[0] for r in ROWS] + [k for k in ours if k.startswith("auth_x")]:
        mine = ours.get(key, {}).get("ops_per_s")
        for peer in ("autobahn", "websockets"):
            theirs = results.get(peer, {}).get(key, {}).get("ops_per_s")
            if mine and theirs:
                out.setdefault(key, {})[f"ours/{peer}"] = round(mine / theirs, 2)
            mine_cpu = ours.get(key, {}).get("server_cpu_us_per_op")
            theirs_cpu = results.get(peer, {}).get(key, {}).get("server_cpu_us_per_op")
            if mine_cpu and theirs_cpu:
                out.setdefault(key, {})[f"cpu {peer}/ours"] = round(theirs_cpu / mine_cpu, 2)
    return out


def markdown(report: dict) -> str:
    results, m = report["results"], report["machine"]
    targets = [t for t in TARGETS if t in results]
    lines = [f"# circles benchmark, {report['date']} ({report['mode']} mode)", "",
             f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['mem_total_gb']} GB, "
             f"Linux {m['kernel']}, {m['implementation']} {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + f". Load average at start {m['loadavg_start'][0]:.2f}, at end {report['loadavg_end'][0]:.2f}. "
             f"Servers pinned to CPU {SERVER_CPU}, load generator to CPU {CLIENT_CPU}"
             + ("" if report["pinned"] else " (pinning was OFF)") + f". circles at {m['git_commit']}"
             + (" (dirty)" if m["git_dirty"] else "") + ".", ""]
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
            cell = f"**{r['ops_per_s']:,.0f}** {unit}<br>{r['p50_ms']} / {r['p99_ms']} ms"
            if r.get("server_cpu_us_per_op"):
                cell += f"<br>{r['server_cpu_us_per_op']} us CPU, {r['server_cpu_util'] * 100:.0f}% busy"
            if r.get("others_on_server_cpu") is not None:
                cell += f", others {r['others_on_server_cpu'] * 100:.0f}%"
            if r.get("client_cpu_util") is not None:
                cell += f"<br>load generator {r['client_cpu_util'] * 100:.0f}% busy"
            if r.get("errors"):
                cell += f"<br>{r['errors']} errors"
            cells.append(cell)
        ra = rat.get(key, {})
        ratio_cells = [f"{ra.get(f'ours/{peer}', 'n/a')}<br>(CPU {ra.get(f'cpu {peer}/ours', 'n/a')})"
                       for peer in ("autobahn", "websockets")]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratio_cells) + " |")
    lines += ["", "Goal: ours/autobahn >= 0.9 and ours/websockets >= 1.0 on fetch_nonce and auth.",
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
    lines += ["## Memory", "", "| | " + " | ".join(targets) + " |", "|" + "---|" * (len(targets) + 1)]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds and small counts, for development")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: ours,autobahn,websockets,ours-2p,ours-open")
    parser.add_argument("--workloads", default="rpc,auth,idle,churn", help="comma-separated: rpc,auth,idle,churn")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of ours")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by servers and load generator
    pinned = not args.no_pin
    if pinned and (not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2):
        sys.exit("need taskset and two CPUs (or --no-pin)")
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    outdir = Path(args.out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S") + ("-quick" if args.quick else "")
    logdir = Path(tempfile.mkdtemp(prefix="circles-bench-"))
    started = time.monotonic()
    report = {"date": stamp, "mode": mode, "plan": plan, "pinned": pinned, "nofile": hard,
              "machine": machine_info(), "server_logs": str(logdir), "results": {}}
    log(f"{mode} run, targets {targets}, server logs in {logdir}")
    for target in targets:
        report["results"][target] = run_target(target, plan, logdir, pinned, workloads)
    if not args.no_profile and "ours" in targets:
        report["profile"] = {name: profile_ours(plan, logdir, outdir, stamp, pinned, name) for name in PROFILES}
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
