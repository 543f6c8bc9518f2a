"""Send N signed Stripe webhooks to a running circles server and report verified requests/s.

    CIRCLES_STRIPE_WEBHOOK_SECRET=whsec_bench twistd -n circles -k <pk> --listen tcp:8080:interface=127.0.0.1
    CIRCLES_STRIPE_WEBHOOK_SECRET=whsec_bench python bench/webhooks.py http://127.0.0.1:8080/webhooks/stripe/<pk> -n 5000 -c 50

Each request is a distinct event (so none is a duplicate), signed with stripe-python's own
helper, over persistent HTTP/1.1 connections, at most ``-c`` in flight. Loopback addresses only:
this is a load generator, not something to point at someone else's server. The secret is read
from the environment, like the server's.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import time
import uuid
import warnings
from collections import Counter
from io import BytesIO
from urllib.parse import urlsplit

import stripe
from twisted.internet import defer, task
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 1000


def loopback_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing {host!r}: loopback addresses only")


def event_body(n: int) -> bytes:
    return json.dumps({
        "id": f"evt_bench_{uuid.uuid4().hex}", "object": "event", "api_version": "2024-06-20",
        "created": int(time.time()), "livemode": False, "type": "payment_intent.succeeded",
        "data": {"object": {"id": f"pi_{n}", "object": "payment_intent", "amount": 2000, "currency": "eur"}},
    }).encode("utf-8")


async def run(reactor, url: str, secret: str, total: int, concurrency: int) -> int:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    agent = Agent(reactor, pool=pool)
    statuses: Counter = Counter()
    latencies: list = []
    remaining = iter(range(total))

    async def client() -> None:
        for n in remaining:
            body = event_body(n)
            header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret)
            headers = Headers({b"stripe-signature": [header.encode()], b"content-type": [b"application/json"]})
            began = time.perf_counter()
            try:
                response = await agent.request(b"POST", url.encode(), headers, FileBodyProducer(BytesIO(body)))
                await readBody(response)
                statuses[response.code] += 1
            except Exception as e:
                statuses[type(e).__name__] += 1
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(client()) for _ in range(concurrency)])
    elapsed = time.perf_counter() - began
    await pool.closeCachedConnections()
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    print(f"{total} webhooks, {concurrency} concurrent: {elapsed:.2f}s, {total / elapsed:.0f} requests/s; "
          f"latency p50 {percentile(0.5):.1f} ms, p99 {percentile(0.99):.1f} ms; statuses {dict(statuses)}")
    return 0 if set(statuses) == {200} else 1


def main() -> int:
    # Agent's own transports make readBody warn; nothing to do with what is measured.
    warnings.filterwarnings("ignore", "Using readBody", DeprecationWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="http://127.0.0.1:PORT/webhooks/stripe/<circle_pk>")
    parser.add_argument("-n", "--requests", type=int, default=2000)
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    args = parser.parse_args()
    secret = os.environ.get("CIRCLES_STRIPE_WEBHOOK_SECRET", "").split(",")[0].strip()
    if not secret:
        parser.error("set CIRCLES_STRIPE_WEBHOOK_SECRET (the server's secret)")
    if not 0 < args.requests <= MAX_REQUESTS or not 0 < args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"-n must be 1..{MAX_REQUESTS}, -c 1..{MAX_CONCURRENCY}")
    loopback_only(args.url)
    return task.react(lambda reactor: defer.ensureDeferred(
        run(reactor, args.url, secret, args.requests, args.concurrency)))


if __name__ == "__main__":
    sys.exit(main())
