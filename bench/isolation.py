"""What running an engine in a child process costs per script, without Redis or a server.

    .venv/bin/python -m bench.isolation [--engine circles.worker.tiny_engine:run] [--calls 2000] [--rounds 3]

Calls the engine ``--calls`` times, one at a time, on the script ``40 + 2``: in this process (as
``--isolation none`` does) and through :class:`circles.worker.isolation.IsolatedEngine` with one
child started ahead (``--isolation process``), taking the two in turn ``--rounds`` times. The
difference per call is the round trip over the pipes (two frames, two wake-ups of each side).
Also the time to start a child (spawn until ready). Reports JSON.

    .venv/bin/python -m bench.isolation --in-flight 16 --size 16 [--depth 4] [--calls 20000]

Keeps ``--in-flight`` scripts going through ``--size`` children instead (as a busy worker
does), and reports scripts/s and the CPU per script of this process (the worker's side) and of
the children, from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react

from bench.play import TreeCPU, cpu_seconds, machine
from circles.worker.engines import ScriptContext, load_engine
from circles.worker.isolation import DEPTH, IsolatedEngine

CONTEXT = ScriptContext(task_id="bench", circle="02" + "ab" * 32, caller="", source="ws", max_output=1 << 20)
SCRIPT = "40 + 2"


async def run(reactor, args) -> None:
    inline = load_engine(args.engine)
    rounds = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.calls):
            inline(SCRIPT, CONTEXT)
        in_process = (time.perf_counter() - started) / args.calls
        engine = IsolatedEngine(args.engine, reactor=reactor, size=1)
        started = time.perf_counter()
        await engine.start()
        spawn = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.calls):
            await engine(SCRIPT, CONTEXT)
        isolated = (time.perf_counter() - started) / args.calls
        await engine.stop()
        rounds.append({"in_process_us": round(in_process * 1e6, 1), "isolated_us": round(isolated * 1e6, 1),
                       "overhead_us": round((isolated - in_process) * 1e6, 1), "child_start_ms": round(spawn * 1e3, 1)})
    print(json.dumps({"engine": args.engine, "calls": args.calls, "rounds": rounds, "machine": machine()}, indent=2))


async def in_flight(reactor, args) -> None:
    rounds = []
    for _ in range(args.rounds):
        engine = IsolatedEngine(args.engine, reactor=reactor, size=args.size, depth=args.depth)
        await engine.start()
        meter = TreeCPU([os.getpid()])
        meter.start()
        own = cpu_seconds(os.getpid()) or 0.0
        started = time.perf_counter()

        async def lane(engine: IsolatedEngine, calls: int) -> None:
            for _ in range(calls):
                await engine(SCRIPT, CONTEXT)

        await gatherResults([ensureDeferred(lane(engine, args.calls // args.in_flight)) for _ in range(args.in_flight)])
        elapsed = time.perf_counter() - started
        own = (cpu_seconds(os.getpid()) or 0.0) - own
        everything = meter.stop()
        calls = args.calls // args.in_flight * args.in_flight
        await engine.stop()
        rounds.append({"scripts_per_s": round(calls / elapsed), "worker_cpu_us": round(own / calls * 1e6, 1),
                       "children_cpu_us": round((everything - own) / calls * 1e6, 1)})
    print(json.dumps({"engine": args.engine, "calls": args.calls, "in_flight": args.in_flight, "size": args.size,
                      "depth": args.depth, "rounds": rounds, "machine": machine()}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="circles.worker.tiny_engine:run")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=0, help="scripts kept in flight (0: one at a time, in "
                        "process and through one child)")
    parser.add_argument("--size", type=int, default=1, help="with --in-flight: children")
    parser.add_argument("--depth", type=int, default=DEPTH, help="with --in-flight: scripts a child may hold")
    args = parser.parse_args()
    react(lambda reactor: ensureDeferred((in_flight if args.in_flight else run)(reactor, args)))


if __name__ == "__main__":
    main()
