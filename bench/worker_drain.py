"""The worker alone: CPU per task to drain a queue of N plays, no server, no load generator.

    .venv/bin/python -m bench.worker_drain [--tasks 20000] [--concurrency 16] [--engine SPEC] [--isolation MODE]
    .venv/bin/python -m bench.worker_drain --root /path/to/another/checkout   # the same, that checkout's worker
    .venv/bin/python -m bench.worker_drain --callgrind --tasks 3000          # its instructions a task (valgrind)

Starts a redis-server of its own (a Unix socket in a temporary directory), starts ``twistd circles-worker``, and once
it is ready writes N tasks as a server's ENQUEUE would (their replies to a list nobody reads) and
reports, once every reply is there, the worker's CPU (its engine children included)
and Redis's per task, and the wall time. The queue always holds a backlog, as under load; what it
measures is the worker's own cost per task, steady on a shared machine where plays/s is not.
``--callgrind`` runs the worker under valgrind's callgrind, counting over the drain only, and
reports its instructions a task too: with the queue full, every TAKE takes as many tasks as
slots are free, so the count is steadier than ``bench/instructions.py --part worker``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import coincurve
import redis

from bench.instructions import control, instructions
from bench.play import TreeCPU, machine

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--engine", default="circles.worker.tiny_engine:run")
    parser.add_argument("--isolation", default=None)
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose worker runs")
    parser.add_argument("--callgrind", action="store_true",
                        help="the worker under callgrind: its instructions a task over the drain (and slowly)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="the worker under cProfile (twistd --profiler cprofile --savestats), its stats into FILE")
    args = parser.parse_args()
    circle = coincurve.PrivateKey().public_key.format().hex()
    with tempfile.TemporaryDirectory() as state:
        sock = os.path.join(state, "redis.sock")
        server = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", sock, "--save", "",
                                   "--appendonly", "no", "--dir", state], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.02)
            r = redis.Redis(unix_socket_path=sock)
            r.ping()
            command = [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "--logfile=-",
                       *([f"--profile={os.path.abspath(args.profile)}", "--profiler=cprofile", "--savestats"]
                         if args.profile else []),
                       "circles-worker", "-k", circle, "--redis-url", f"unix://{sock}", "--engine", args.engine,
                       "--concurrency", str(args.concurrency),
                       *(["--isolation", args.isolation] if args.isolation else [])]
            if args.callgrind:
                command = [shutil.which("valgrind"), "--tool=callgrind", "--instr-atstart=no",
                           f"--callgrind-out-file={os.path.join(state, 'callgrind.out')}", sys.executable, *command]
            worker = subprocess.Popen(command, cwd=state, env=dict(os.environ, PYTHONPATH=args.root),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while not r.zcard("circles:workers") or time.monotonic() < deadline - 57:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError("the worker did not start")
                time.sleep(0.05)  # registered, and 3 s for its engine's children to be ready
            r.config_resetstat()
            cpu = TreeCPU([worker.pid])
            own_cpu = TreeCPU([worker.pid], descendants=False)  # the worker's process alone, its children left out
            redis_cpu = TreeCPU([server.pid])
            cpu.start()
            own_cpu.start()
            redis_cpu.start()
            if args.callgrind:
                control(worker.pid, "-i", "on")
            started = time.monotonic()
            now = time.time()
            pipe = r.pipeline(transaction=False)
            for i in range(args.tasks):
                task = f"t{i}"
                pipe.hset(f"circles:task:{task}", mapping={
                    "script": "40 + 2", "circle": circle, "caller": circle, "source": "ws",
                    "reply_to": "bench:replies", "status": "pending", "output": "", "error": "",
                    "created_at": f"{now:.3f}", "updated_at": f"{now:.3f}", "deadline": f"{now + 3600:.3f}",
                    "max_output": "1048576"})
                pipe.lpush(f"circles:queue:{circle}", task)
                if i % 1000 == 999:
                    pipe.execute()
            pipe.execute()
            while r.llen("bench:replies") < args.tasks:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited {worker.returncode}")
                if time.monotonic() - started > 600:
                    raise RuntimeError("not drained within 600 s")
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            used, used_own, used_redis = cpu.stop(), own_cpu.stop(), redis_cpu.stop()
            counted = None
            if args.callgrind:
                control(worker.pid, "-i", "off")
                control(worker.pid, "-d")
                counted = round(instructions(state, "callgrind.out") / args.tasks)
            # The worker's commands (this script's own HSET, LPUSH and LLEN left out), per task.
            ours = {"hset", "lpush", "llen", "config", "info"}
            commands = {name[len("cmdstat_"):]: round(stats["calls"] / args.tasks, 3)
                        for name, stats in r.info("commandstats").items() if name[len("cmdstat_"):] not in ours}
            worker.terminate()
            worker.wait(30)
            errors = sum(1 for reply in r.lrange("bench:replies", 0, 50) if b'"status": "error"' in reply
                         or b'"status":"error"' in reply)
        finally:
            server.terminate()
            server.wait(10)
    print(json.dumps({"tasks": args.tasks, "root": args.root, "engine": args.engine, "isolation": args.isolation,
                      "concurrency": args.concurrency, "seconds": round(elapsed, 2),
                      "tasks_per_s": round(args.tasks / elapsed), "worker_cpu_us_per_task": round(used / args.tasks * 1e6, 1),
                      "worker_own_cpu_us_per_task": round(used_own / args.tasks * 1e6, 1),
                      "redis_cpu_us_per_task": round(used_redis / args.tasks * 1e6, 1),
                      **({"worker_instructions_per_task": counted} if args.callgrind else {}),
                      "commands_per_task": commands, "errors_in_first_50": errors, "machine": machine()}))


if __name__ == "__main__":
    main()
