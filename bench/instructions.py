"""Instructions a call costs the server or the worker, counted by callgrind: the same figure
however busy the machine is, for changes too small for the rounds of bench/play.py to tell apart.

    .venv/bin/python -m bench.instructions                          # play: the server's instructions a play
    .venv/bin/python -m bench.instructions --part worker            # play: the worker's (its engine children apart)
    .venv/bin/python -m bench.instructions --workload whoami        # the server's a whoami call
    .venv/bin/python -m bench.instructions --workload whoami --tls  # the same over wss://
    .venv/bin/python -m bench.instructions --root /path/to/another/checkout --repeat 3
    .venv/bin/python -m bench.instructions --keep DIR && callgrind_annotate DIR/1/callgrind.out.1 | head -40

Starts ``twistd -n circles --auth`` (with its private Redis) and a worker (the tiny engine, in
engine children as by default), one of the two (``--part``) under ``valgrind --tool=callgrind
--instr-atstart=no``: it runs, slowly, counting nothing. It opens ``--connections`` WebSockets
(the ``websockets`` client), authenticates each (eth personal_sign), has each make ``--warmup``
calls, one in flight per connection; then turns counting on (``callgrind_control -i on``),
has them make ``--calls`` calls in all, turns it off, and reports the instructions executed
(callgrind's ``Ir``: of that process alone, its kernel time not included) per call. With
``--tls`` the server has a certificate of a CA made for the run (``trustme``), and the client
speaks ``wss://`` to it.

What it counts is the Python and C code the process runs, not the system calls' cost in the
kernel, waiting, or caches: a change that saves instructions shows here whatever else runs on
the machine, and a change in how often processes wake (what costs most on this machine, a VM)
does not. The part under valgrind runs some 50 times slower than the other processes, so it
always finds every connection's call waiting (for the server: plays queued and replies popped
in full batches): the busy regime, the one that bounds plays/s. Repeat runs agree within about
half a per cent (``--repeat``); before/after pairs of checkouts (``--root``) compare within that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import coincurve
import trustme
import websockets
from eth_account import Account
from eth_account.messages import encode_defunct

from bench.play import machine

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
CALLS = {
    "play": '{{"jsonrpc":"2.0","method":"play","params":{{"script":"40 + 2"}},"id":{i}}}',
    "whoami": '{{"jsonrpc":"2.0","method":"whoami","id":{i}}}',
}


def start(argv: list, state: str, root: str, log: str, callgrind: str = None) -> subprocess.Popen:
    command = [TWISTD, "-n", "--pidfile=", "--logfile=-", *argv]
    if callgrind:
        command = [shutil.which("valgrind"), "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={callgrind}", sys.executable, *command]
    return subprocess.Popen(command, cwd=state, env=dict(os.environ, PYTHONPATH=root),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for_line(log: str, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, Path(log).read_text())
        if match:
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"never saw {pattern!r} in {log}:\n{Path(log).read_text()[-2000:]}")


def control(pid: int, *args: str) -> None:
    subprocess.run([shutil.which("callgrind_control"), *args, str(pid)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def instructions(dump_dir: str, prefix: str) -> int:
    """The ``Ir`` of every dump callgrind wrote (``callgrind_control -d``, and at exit), summed."""
    total = 0
    for path in Path(dump_dir).glob(f"{prefix}*"):
        match = re.search(r"^totals:\s*(\d+)", path.read_text(errors="replace"), re.M)
        if match:
            total += int(match.group(1))
    return total


async def calls(url: str, workload: str, connections: int, warmup: int, count: int, counting,
                tls: ssl.SSLContext | None = None) -> dict:
    template = CALLS[workload]
    left = {"warm": warmup * connections, "measured": count}
    warmed = asyncio.Event()
    go = asyncio.Event()

    async def one(key: coincurve.PrivateKey) -> None:
        pubkey = key.public_key.format().hex()
        async with websockets.connect(url, max_size=None, compression=None, ping_interval=None,
                                      open_timeout=60, close_timeout=60, ssl=tls) as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "fetch_nonce", "params": {"pubkey": pubkey},
                                      "id": 0}))
            nonce = json.loads(await ws.recv())["result"]["nonce"]
            signature = Account.from_key(key.secret).sign_message(encode_defunct(text=nonce)).signature.hex()
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "authenticate",
                                      "params": {"pubkey": pubkey, "signature": signature}, "id": 1}))
            assert "result" in json.loads(await ws.recv())
            i = 2
            for name in ("warm", "measured"):
                if name == "measured":
                    warmed.set()  # this one's share of the warm-up is done
                    await go.wait()
                while left[name] > 0:
                    left[name] -= 1
                    await ws.send(template.format(i=i))
                    reply = json.loads(await ws.recv())
                    if "result" not in reply:
                        raise RuntimeError(f"{workload} failed: {reply}")
                    i += 1

    tasks = [asyncio.create_task(one(coincurve.PrivateKey())) for _ in range(connections)]
    waiting = asyncio.create_task(warmed.wait())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done() and task.exception():
            raise task.exception()
    await asyncio.sleep(1)  # the last warm-up calls answered everywhere
    counting(True)
    started = time.monotonic()
    go.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    counting(False)
    return {"calls": count, "seconds": round(elapsed, 1)}


def run_once(args, state: str) -> dict:
    circle = coincurve.PrivateKey().public_key.format().hex()
    out = os.path.join(state, "callgrind.out")
    server_log, worker_log = os.path.join(state, "server.log"), os.path.join(state, "worker.log")
    procs = []
    tls_args, client_tls, scheme = [], None, "ws"
    if args.tls:
        ca = trustme.CA()
        cert = os.path.join(state, "server.pem")
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(cert)
        tls_args, client_tls, scheme = ["--tls-cert", cert], ssl.create_default_context(), "wss"
        ca.configure_trust(client_tls)
    try:
        server = start(["circles", "--auth", "-k", circle, "--port", "0", "--interface", "127.0.0.1",
                        "--rate-limit", "1e9", "--state-dir", state, *tls_args], state, args.root, server_log,
                       out if args.part == "server" else None)
        procs.append(server)
        port = int(wait_for_line(server_log, r"starting on (\d+)", server).group(1))
        wait_for_line(server_log, r"connected to Redis", server)
        if args.workload == "play":
            worker = start(["circles-worker", "-k", circle, "--state-dir", state, "--engine", args.engine,
                            "--concurrency", str(args.concurrency)], state, args.root, worker_log,
                           out if args.part == "worker" else None)
            procs.append(worker)
            wait_for_line(worker_log, r"waiting for tasks", worker)
        counted = server if args.part == "server" else worker

        def counting(on: bool) -> None:
            control(counted.pid, "-i", "on" if on else "off")
            if not on:
                control(counted.pid, "-d")

        result = asyncio.run(calls(f"{scheme}://127.0.0.1:{port}/{circle}", args.workload, args.connections,
                                   args.warmup, args.calls, counting, client_tls))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    total = instructions(state, "callgrind.out")
    result.update(instructions=total, instructions_per_call=round(total / args.calls))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(CALLS), default="play")
    parser.add_argument("--part", choices=["server", "worker"], default="server",
                        help="the process counted (worker: play only)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10, help="calls per connection before counting")
    parser.add_argument("--calls", type=int, default=3000, help="calls counted, in all")
    parser.add_argument("--engine", default="circles.worker.tiny_engine:run")
    parser.add_argument("--concurrency", type=int, default=16, help="worker --concurrency")
    parser.add_argument("--tls", action="store_true", help="over wss:// (a certificate made for the run)")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each with fresh processes")
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose server and worker run")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="keep each run's callgrind output and logs in DIR/1, DIR/2, ... (for callgrind_annotate)")
    args = parser.parse_args()
    if args.part == "worker" and args.workload != "play":
        parser.error("--part worker counts plays only")
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("valgrind (Debian's package) is needed: apt-get install valgrind")
    runs = []
    for number in range(1, args.repeat + 1):
        with tempfile.TemporaryDirectory() as state:
            runs.append(run_once(args, state))
            if args.keep:
                kept = Path(args.keep) / str(number)
                kept.mkdir(parents=True, exist_ok=True)
                for path in Path(state).glob("callgrind.out*"):
                    shutil.copy(path, kept)
                for name in ("server.log", "worker.log"):
                    if (Path(state) / name).exists():
                        shutil.copy(Path(state) / name, kept)
        print(json.dumps(runs[-1]), file=sys.stderr)
    per_call = sorted(run["instructions_per_call"] for run in runs)
    print(json.dumps({"workload": args.workload, "part": args.part, "tls": args.tls, "root": args.root,
                      "connections": args.connections, "calls": args.calls, "runs": runs,
                      "median_instructions_per_call": per_call[len(per_call) // 2],
                      "spread": round((per_call[-1] - per_call[0]) / per_call[0], 4),
                      "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
