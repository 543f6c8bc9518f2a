"""What a play waiting for its reply costs the server: heap bytes each, calls of the reactor's
clock held, and CPU per play through a turn of the reactor.

    .venv/bin/python -m bench.waiting_plays [--plays 10000] [--in-flight 200]

Runs the dispatcher's :class:`~circles.backend.replies.Replies` (each play's deadline and routing)
on a real epoll reactor that is not running (no Redis: waiting for a reply never talks to it).
Memory: ``--plays`` plays set waiting, heap before and after (``tracemalloc``, the Deferred and
the request's entry included, the request itself not). CPU: with ``--in-flight`` plays waiting,
the best of five timings of one play's way through (its wait, a turn of the reactor with the
turn's batch call, its reply settled). Run it under each checkout's ``PYTHONPATH`` to compare two.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import timeit
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet.epollreactor import EPollReactor  # noqa: E402

from circles.backend import tasks  # noqa: E402
from circles.backend.replies import Replies  # noqa: E402
from circles.backend.scripts import ScriptRequest  # noqa: E402

REQUEST = ScriptRequest(circle="02" + "%064x" % 1, script="40 + 2", caller="", source="ws", timeout=30.0)
OUTCOME = tasks.Outcome("", tasks.COMPLETED, "42", "", "")


def task_id(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-000000000000"


def memory(plays: int) -> dict:
    reactor = EPollReactor()
    replies = Replies(reactor, tasks.DEFAULT_PREFIX, "reply", None, lambda: True)
    ids = [task_id(n) for n in range(plays)]
    held = []
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for one in ids:
        held.append(replies.wait(one, REQUEST))
    reactor.runUntilCurrent()  # the calls set this turn go into the reactor's heap, as they would next turn
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"bytes_per_waiting_play": round(used / plays), "reactor_calls": len(reactor.getDelayedCalls())}


def cpu(in_flight: int, number: int = 50_000) -> float:
    reactor = EPollReactor()
    replies = Replies(reactor, tasks.DEFAULT_PREFIX, "reply", None, lambda: True)
    waiting: collections.deque = collections.deque()
    count = 0

    def one() -> None:
        nonlocal count
        count += 1
        replies.wait(task_id(count), REQUEST)
        waiting.append(task_id(count))
        reactor.callLater(0, lambda: None)  # the turn's batch of ENQUEUEs is a call of the clock
        reactor.runUntilCurrent()
        replies.settle(waiting.popleft(), OUTCOME)

    for _ in range(in_flight):
        count += 1
        replies.wait(task_id(count), REQUEST)
        waiting.append(task_id(count))
    return min(timeit.repeat(one, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plays", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=200)
    args = parser.parse_args()
    if args.plays < 1 or args.in_flight < 1:
        parser.error("--plays and --in-flight take a positive number")
    print(json.dumps({"plays": args.plays, **memory(args.plays), "in_flight": args.in_flight,
                      "us_per_play": round(cpu(args.in_flight), 2)}))


if __name__ == "__main__":
    main()
