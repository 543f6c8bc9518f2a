"""A worker SIGKILLed in the middle of a flood of plays: is every play answered, and is nothing left?

    .venv/bin/python -m bench.worker_kill [--connections 20] [--seconds 12] [--kill-after 5]

Starts ``twistd -n circles --auth`` (its private Redis) and two ``twistd -n circles-worker``
(the tiny engine, ``--concurrency 16``, ``--isolation process``), puts the Node generator's play
load on (bench/node/loadgen.mjs, one play in flight per connection), SIGKILLs the first worker
``--kill-after`` seconds into it and lets the second carry on. Reports JSON: the plays answered
and those that failed (the generator's count and its last error: the scripts the killed worker
was running fail with -32005, none may go unanswered, or the generator times out), the killed
worker's engine processes still alive afterwards, and what Redis holds at the end (the circle's
queue, the processing lists, the live workers). A check, not a speed: loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time

import coincurve
import redis

from bench.play import TreeCPU, cpu_seconds, drain, start, stop, wait_for
from bench.run import choose_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--kill-after", type=float, default=5)
    parser.add_argument("--engine", default="circles.worker.tiny_engine:run")
    args = parser.parse_args()
    generator = choose_generator("node")
    circle = coincurve.PrivateKey().public_key.format().hex()
    with tempfile.TemporaryDirectory() as state:
        server = start(["circles", "--auth", "-k", circle, "--port", "0", "--interface", "127.0.0.1",
                        "--state-dir", state], state)
        workers = []
        try:
            port = int(wait_for(server, r"starting on (\d+)").group(1))
            wait_for(server, r"connected to Redis")
            drain(server)
            for _ in range(2):
                worker = start(["circles-worker", "-k", circle, "--state-dir", state, "--engine", args.engine,
                                "--concurrency", "16"], state)
                workers.append(worker)
                wait_for(worker, r"waiting for tasks")
                drain(worker)
            doomed = workers[0]
            children = [pid for pid in TreeCPU._tree(doomed.pid) if pid != doomed.pid]
            busy: dict = {}

            def kill() -> None:
                time.sleep(1 + args.kill_after)  # the generator's second of warm-up first
                busy["before"] = cpu_seconds(doomed.pid)
                time.sleep(1)
                busy["after"] = cpu_seconds(doomed.pid)  # working when killed: its CPU moves
                doomed.send_signal(signal.SIGKILL)
                r = redis.Redis(unix_socket_path=os.path.join(state, "redis.sock"), decode_responses=True)
                busy["held"] = {key: r.llen(key) for key in r.scan_iter("circles:processing:*")}

            killer = threading.Thread(target=kill, daemon=True)
            load = subprocess.Popen([*generator.command, "play", "--url", f"ws://127.0.0.1:{port}", "--circle", circle,
                                     "--connections", str(args.connections), "--duration", str(args.seconds),
                                     "--warmup", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            killer.start()
            out, _ = load.communicate(timeout=args.seconds + 120)
            killer.join()
            doomed.wait(30)
            result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"generator_exit": load.returncode}
            time.sleep(2)  # the killed worker's children see their parent go (PR_SET_PDEATHSIG)
            r = redis.Redis(unix_socket_path=os.path.join(state, "redis.sock"), decode_responses=True)
            report = {
                "connections": args.connections, "seconds": args.seconds, "killed_after": args.kill_after,
                "plays_answered_in_window": result.get("plays"), "plays_failed": result.get("errors"),
                "last_error": result.get("last_error"),
                "killed_worker_cpu_in_its_last_second": round((busy.get("after") or 0) - (busy.get("before") or 0), 2),
                "processing_lists_at_the_kill": busy.get("held"),
                "killed_workers_engine_processes": len(children),
                "of_those_still_alive": sum(1 for pid in children if os.path.exists(f"/proc/{pid}")),
                "queue_left": r.llen(f"circles:queue:{circle}"),
                "processing_lists": {key: r.llen(key) for key in r.scan_iter("circles:processing:*")},
                "live_workers": r.zcard("circles:workers"),
            }
        finally:
            stop([*workers[1:], server])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
