"""The deployment test: real Redis + Sentinels, two servers, two workers, clients over
both; SIGKILL the primary, then a server, under load (devtools/deployment.py). Nothing may be left
unanswered and no acknowledged webhook event may be lost.

Run it alone to see its figures (the ones docs/deployment.md quotes):

    .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/integration/test_deployment.py
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from devtools.deployment import Schedule, print_report, run
from devtools.redis_server import REDIS_SERVER

# Seconds from the primary's SIGKILL to plays succeeding on every client: the failover (~2.3 s
# here), the servers finding the new primary (~1.5 s), and one play that may still run into its
# deadline (5 s: a task lost in the switch is answered -32003, as allowed), with a margin.
PRIMARY_RECOVERY_BOUND = 12.0
SERVER_RECOVERY_BOUND = 5.0  # seconds from a server's SIGKILL to its clients playing on the other one


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
@pytest_twisted.ensureDeferred
async def test_a_deployment_loses_nothing_across_a_primary_failover_and_a_server_kill(tmp_path):
    schedule = Schedule()
    report = await run(reactor, str(tmp_path), schedule)
    print_report(report)
    plays, webhooks = report["plays"], report["webhooks"]

    # Every play was answered: its result, or an error at once or at its deadline; never a hang.
    assert plays["unanswered"] == 0
    assert plays["wrong_output"] == 0 and not plays["other_errors"]
    assert set(plays["failed_by_code"]) <= {"-32003", "-32004"}
    assert plays["slowest_answer_s"] <= schedule.play_timeout + 3
    assert plays["ok"] > 0

    # Plays succeed again after each kill, on every client, within a bound.
    primary, server = report["kills"]
    assert primary["what"] == "primary" and server["what"] == "server0"
    assert primary["all_clients_ok_s"] is not None and primary["all_clients_ok_s"] <= PRIMARY_RECOVERY_BOUND
    assert server["all_clients_ok_s"] is not None and server["all_clients_ok_s"] <= SERVER_RECOVERY_BOUND
    # The clients of both servers kept working: those of the killed one over the other.
    clients = report["clients"]
    assert clients["ok_after_server_kill"] == {"started_on_killed": clients["started_on_killed_server"],
                                              "started_on_other": clients["count"] - clients["started_on_killed_server"]}

    # Every acknowledged webhook event is on the final primary, events were acknowledged after the
    # failover too (so this is not vacuous), and a redelivery is recognised across the failover.
    assert webhooks["unanswered"] == 0
    assert webhooks["missing"] == [] and webhooks["seen_key_only"] == []
    assert webhooks["tasks_found"] == webhooks["acked"]
    assert set(webhooks["task_statuses"]) <= {"pending", "processing", "completed"}  # the events' script ran
    assert webhooks["acked_after_failover"] > 0
    assert webhooks["redelivered"] > 0 and webhooks["redelivered_same_task"] == webhooks["redelivered"]
    assert set(webhooks["by_status"]) <= {"200", "503", "ConnectionRefusedError", "ResponseNeverReceived"}

    # No server or worker logged a traceback through all this.
    assert report["tracebacks"] == {"server0": 0, "server1": 0, "worker0": 0, "worker1": 0}
    assert report["total_s"] < 60
