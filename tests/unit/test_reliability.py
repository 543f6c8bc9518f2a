"""An acknowledged task is never lost; workers can be seen (docs/worker-protocol.md).

Workers take tasks into a processing list of their own and heartbeat; when one stops
heartbeating (killed, or paused past its TTL), a reaper (any worker, any server) re-runs its
webhook tasks, up to ``max_attempts``, then dead-letters them, and answers its plays at once with
an error (a play is never run twice). Here what needs no Redis (the error codes, the log text, the
option check); real redis-servers and ``twistd`` processes in tests/integration/test_reliability.py.
"""

from __future__ import annotations

import pytest
from twisted.internet import reactor

from circles.backend.redis_url import parse_redis_url
from circles.worker.service import Worker, printable

from ..play_client import new_key, pk

CIRCLE = pk(new_key())


@pytest.mark.parametrize("api, code", [("circles", -32008), ("hero", -32008)])
def test_the_earlier_contracts_answer_the_same_code(api, code):
    from circles.server.session.contracts import CONTRACTS
    errors = {e["code"]: e for e in CONTRACTS[api].document()["components"]["errors"].values()}
    assert errors[code]["message"] == "No worker is serving this circle"


def test_printable():
    assert printable("plain text, ünïcödé") == "plain text, ünïcödé"
    assert printable("a\nb\tc\rd\\e\x1b[0m\x7f\x85\u2028\u202e\U000e0001") == \
        "a\\nb\\tc\\rd\\\\e\\x1b[0m\\x7f\\x85\\u2028\\u202e\\U000e0001"


def test_the_worker_ttl_must_exceed_the_heartbeat():
    from twisted.python import usage

    from circles.worker.tap import Options

    options = Options()
    with pytest.raises(usage.UsageError, match="--worker-ttl must be longer than --heartbeat"):
        options.parseOptions(["-k", CIRCLE, "--exec", "sh {script_file}", "--redis-url", "redis://127.0.0.1:1/0",
                              "--heartbeat", "5", "--worker-ttl", "5"])
    with pytest.raises(ValueError):
        Worker(parse_redis_url("redis://127.0.0.1:1/0"), [CIRCLE], lambda s, c: "", reactor=reactor,
               heartbeat=2, worker_ttl=1)
