"""Connections opened all at once under ``--processes N``: how they split, and how soon all are accepted.

    .venv/bin/python -m bench.accept_burst [--processes 2] [--count 500] [--bursts 3]

Starts ``twistd -n circles --processes N`` (its private Redis), then, ``--bursts`` times, opens
``--count`` TCP connections with non-blocking connects in one go (as a client's pool or a load
balancer does at start), polls ``ss`` every 2 ms until the server's processes hold them all,
and closes them. Reports JSON: for each burst, the milliseconds the connects took, the
milliseconds until every one was accepted, and the connections each process holds. Keep
``--count`` under the server's ``--max-pending-per-ip`` (512): connections that never send a
request count against it. Loopback only; a timing, not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import socket
import subprocess
import tempfile
import time

import coincurve

from bench.play import machine, start, stop, wait_for


def held(port: int) -> dict[str, int]:
    """Established connections to ``port`` by the pid holding them (accepted ones only)."""
    out = subprocess.run(["ss", "-tnp", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    return dict(collections.Counter(re.findall(r"pid=(\d+)", out)))


def open_at_once(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to ``port`` on 127.0.0.1 opened at once, none waiting for another:
    non-blocking connects in one go (also tests/integration/test_processes.py's bursts)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        sockets.append(sock)
    return sockets


def burst(port: int, count: int) -> dict:
    began = time.monotonic()
    sockets = open_at_once(port, count)
    connected = time.monotonic()
    while sum(held(port).values()) < count and time.monotonic() - began < 10:
        time.sleep(0.002)
    accepted = time.monotonic()
    split = sorted(held(port).values())
    for sock in sockets:
        sock.close()
    return {"connects_ms": round(1000 * (connected - began), 1), "all_accepted_ms": round(1000 * (accepted - began), 1),
            "held_per_process": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--bursts", type=int, default=3)
    args = parser.parse_args()
    circle = coincurve.PrivateKey().public_key.format().hex()
    with tempfile.TemporaryDirectory() as state:
        server = start(["circles", "-k", circle, "--port", "0", "--interface", "127.0.0.1", "--state-dir", state,
                        "--processes", str(args.processes)], state)
        try:
            port = int(wait_for(server, r"starting on (\d+)").group(1))
            for _ in range(args.processes):  # each process connects: all of them accept
                wait_for(server, r"connected to Redis")
            subprocess.Popen(["cat"], stdin=server.stdout, stdout=subprocess.DEVNULL)
            results = []
            for _ in range(args.bursts):
                results.append(burst(port, args.count))
                while held(port):  # all closed before the next
                    time.sleep(0.05)
        finally:
            stop([server])
    print(json.dumps({"processes": args.processes, "count": args.count, "bursts": results, "machine": machine()},
                     indent=2))


if __name__ == "__main__":
    main()
