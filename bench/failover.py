"""Soak a one-machine deployment through Redis failovers and a server kill.

    .venv/bin/python -m bench.failover [--seconds 120] [--clients 8] [--webhooks-per-second 4]

The harness of tests/integration/test_deployment.py (devtools/deployment.py: a primary, a replica
and three Sentinels, two ``twistd circles`` servers, two workers, ReconnectingClients over both
servers, a Stripe sender) with a longer schedule: a primary SIGKILLed about every 30 s (the old
node back as the new primary's replica each time), then one server SIGKILLed, for about
``--seconds`` of load.
Prints the report and writes it, with the machine's description, to
``bench/results/<date>-failover.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from bench.play import machine
from devtools.deployment import Schedule, run

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help="about how long the load runs")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--webhooks-per-second", type=float, default=4.0)
    parser.add_argument("--play-timeout", type=float, default=5.0)
    parser.add_argument("--direct", action="store_true",
                        help="point servers and workers at the first primary (redis://), not the Sentinels")
    parser.add_argument("--sync-delay", type=int, default=None,
                        help="Redis repl-diskless-sync-delay on every node (default: Redis' own, 5 s)")
    parser.add_argument("--logs", default=None, help="directory to keep the servers' and workers' logs in")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    schedule = Schedule.lasting(args.seconds, clients=args.clients, webhooks_per_second=args.webhooks_per_second,
                                play_timeout=args.play_timeout, direct=args.direct, sync_delay=args.sync_delay)

    async def soak(reactor) -> None:
        with tempfile.TemporaryDirectory() as directory:
            report = await run(reactor, directory, schedule, logs=args.logs)
        report["machine"] = machine()
        text = json.dumps(report, indent=2)
        print(text)
        out = Path(args.out_dir) / f"{time.strftime('%Y-%m-%dT%H%M%S')}-failover.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"written to {out}", file=sys.stderr)

    react(lambda reactor: ensureDeferred(soak(reactor)))


if __name__ == "__main__":
    main()
