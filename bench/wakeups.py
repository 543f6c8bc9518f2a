"""What this machine charges a process for waking up: the CPU an echo process spends per message,
with messages back to back (it finds the next one waiting or is handed the CPU at once) and with
a pause between them (it sleeps idle and is woken for each).

    .venv/bin/python bench/wakeups.py [--messages 3000] [--gap-ms 2]

The echo process does the same work for every message (one ``recv`` and one ``send`` on a Unix
socket pair); what changes is only whether it slept in between. On a virtual machine a vCPU that
went idle halts, and waking it costs exits to the hypervisor, and its caches may come back cold.
That cost lands on every process woken per event: it is why a server's CPU per request depends on
how many requests each wake-up serves (docs/benchmarks.md, "--processes: CPU per play at one
load").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.run import machine_info


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def echo_cpu_us(messages: int, gap: float, sender_cpu: int, echo_cpu: int) -> float:
    """CPU microseconds the echo process spends per message, ``gap`` seconds between messages."""
    ours, theirs = socket.socketpair()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo process
        try:
            ours.close()
            os.sched_setaffinity(0, {echo_cpu})
            start = _cpu_seconds()
            while data := theirs.recv(1):
                theirs.send(data)
            os.write(report_w, json.dumps((_cpu_seconds() - start) / messages * 1e6).encode())
        finally:
            os._exit(0)
    theirs.close()
    os.close(report_w)
    os.sched_setaffinity(0, {sender_cpu})
    for _ in range(messages):
        ours.send(b"x")
        ours.recv(1)
        if gap:
            time.sleep(gap)
    ours.close()
    with os.fdopen(report_r) as report:
        result = json.loads(report.read())
    os.waitpid(pid, 0)
    return round(result, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--gap-ms", type=float, default=2.0, help="the pause between messages that lets the echo sleep")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    placements = [("same CPU", cpus[-1], cpus[-1])] + ([("two CPUs", cpus[0], cpus[-1])] if len(cpus) > 1 else [])
    rows = []
    for name, sender, echo in placements:
        busy = echo_cpu_us(args.messages, 0, sender, echo)
        idle = echo_cpu_us(args.messages, args.gap_ms / 1000, sender, echo)
        rows.append({"placement": name, "back_to_back_us": busy, "after_a_pause_us": idle,
                     "wake_up_us": round(idle - busy, 1)})
    m = machine_info()
    print(f"Machine: {m['cpu_model']}, {m['logical_cpus']} CPUs, Linux {m['kernel']}; "
          f"{args.messages} messages, pause {args.gap_ms} ms", file=sys.stderr)
    print("| echo and sender | CPU a message, back to back (us) | after a pause (us) | a wake-up costs (us) |",
          file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['placement']} | {r['back_to_back_us']} | {r['after_a_pause_us']} | {r['wake_up_us']} |",
              file=sys.stderr)
    print(json.dumps({"messages": args.messages, "gap_ms": args.gap_ms, "rows": rows, "machine": m}, indent=2))


if __name__ == "__main__":
    main()
