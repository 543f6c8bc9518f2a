"""How long ``twistd -n circles`` takes to listen: seconds from exec to the first TCP connect its
port accepts, and the CPU seconds the process had used by then, for one checkout or several in
turn (A B A B ...: a loaded machine's drift falls on all alike).

    .venv/bin/python -m bench.startup [--runs 11] [CHECKOUT ...]

Each CHECKOUT (default: this one) runs its own ``.venv/bin/twistd -n circles --redis-url URL
--port P --interface 127.0.0.1`` (a redis-server started here, so no private Redis; a fresh port
each run), polled every 2 ms with a connect; the CPU is the process's ``/proc/PID/schedstat`` at
that moment; then it is stopped (SIGTERM) and the next one starts. Prints each checkout's runs,
sorted, and their medians. Whether a checkout's modules are compiled (``__pycache__``, as
``scripts/setup`` leaves them) is the checkout's own state: docs/benchmarks.md, "Start-up".
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.redis_server import RedisProcess, free_port  # noqa: E402


def listening(checkout: Path, redis_url: str, cwd: str) -> tuple[float, float]:
    """(wall seconds to the first accepted connect, CPU seconds used by then) of one start."""
    port = free_port()
    command = [str(checkout / ".venv" / "bin" / "twistd"), "-n", "--pidfile=", "circles", "--redis-url", redis_url,
               "--port", str(port), "--interface", "127.0.0.1"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    try:
        while True:
            with socket.socket() as probe:
                try:
                    probe.connect(("127.0.0.1", port))
                except OSError:
                    if process.poll() is not None:
                        raise SystemExit(f"{checkout}: twistd exited with {process.returncode} before listening") \
                            from None
                    time.sleep(0.002)
                    continue
                wall = time.perf_counter() - started
                with open(f"/proc/{process.pid}/schedstat") as f:
                    cpu = int(f.read().split()[0]) / 1e9
                return wall, cpu
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", type=Path, default=[ROOT],
                        help="checkouts with a .venv (scripts/setup), run in turn (default: this one)")
    parser.add_argument("--runs", type=int, default=11, help="starts of each checkout (default 11)")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkouts]
    for checkout in checkouts:
        if not (checkout / ".venv" / "bin" / "twistd").exists():
            parser.error(f"{checkout} has no .venv/bin/twistd: run its scripts/setup")
    results: dict[Path, list[tuple[float, float]]] = {c: [] for c in checkouts}
    with tempfile.TemporaryDirectory(prefix="circles-startup-") as tmp:
        redis = RedisProcess(tmp)
        redis.start()
        try:
            for _ in range(args.runs):
                for checkout in checkouts:
                    results[checkout].append(listening(checkout, redis.url, tmp))
        finally:
            redis.kill()
    for checkout, runs in results.items():
        walls, cpus = sorted(w for w, _ in runs), sorted(c for _, c in runs)
        print(f"{checkout}")
        print(f"  wall  median {statistics.median(walls):.2f} s: {' '.join(f'{w:.2f}' for w in walls)}")
        print(f"  cpu   median {statistics.median(cpus):.2f} s: {' '.join(f'{c:.2f}' for c in cpus)}")


if __name__ == "__main__":
    main()
