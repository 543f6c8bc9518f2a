"""A deployment of the Rust circles server switches over unchanged: its variable names
(``STRIPE_WEBHOOK_SECRET``, ``IDENFY_WEBHOOK_SECRET``, ``REDIS_URL``) and its clients' habit of
writing keys uncompressed (130 hex digits) in the path.

End to end through real ``twistd -n circles`` and ``twistd -n circles-worker`` processes on a real
redis-server; the WebSocket client is the ``websockets`` library, the Stripe signature Stripe's own.
(The names as the options and the environment read them: tests/unit/test_original_names.py.)
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from websockets.sync.client import connect

from circles import webhooks
from circles.backend.redis_options import REDIS_URL_ENV
from circles.server.providers.secrets import STRIPE_ENV
from devtools.webhook_support import (
    IDENFY_SECRET,
    STRIPE_SECRET,
    STRIPE_SECRET_OLD,
    encode,
    idenfy_callback,
    idenfy_headers,
    stripe_event,
    stripe_headers,
)

from ..support import Key, request, run_twistd_to_exit, twistd

SHELL_WORKER = ["--exec", "sh {script_file}"]


def _http(port: int, path: str, body: bytes = None, headers: dict = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _completed(redis_client, task_id: str) -> dict:
    key = f"circles:task:{task_id}"
    deadline = time.monotonic() + 60
    while (task := redis_client.hgetall(key)).get("status") not in ("completed", "error"):
        assert time.monotonic() < deadline, task
        time.sleep(0.02)
    return task


def _output(reply: dict) -> str:
    """A play's output, whichever result shape the connection gets (``{output}`` or a string)."""
    result = reply["result"]
    return result["output"] if isinstance(result, dict) else result


def test_a_rust_era_deployment_works_through_its_own_variable_names(tmp_path, redis_server, redis_client,
                                                                    monkeypatch):
    circle, user = Key(), Key()
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET)
    monkeypatch.setenv("IDENFY_WEBHOOK_SECRET", IDENFY_SECRET)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    # The event as the script saw it, in a file: a finished task keeps no output in Redis.
    (tmp_path / "stripe.sh").write_text(f'printf "%s" "$CIRCLES_DATA" > {tmp_path}/"$CIRCLES_TASK_ID".out\n')
    # No --redis-url, no secret file: without the original names the server would start a private
    # redis-server and refuse every webhook (404: provider off), and the worker would find no Redis.
    args = ["--listen", "tcp:0:interface=127.0.0.1", "-k", circle.uncompressed, "--auth",
            "--stripe-script", str(tmp_path / "stripe.sh")]
    with twistd(args, tmp_path) as server, \
            twistd(["-k", circle.pubkey, *SHELL_WORKER], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        assert not (tmp_path / "circles-state").exists() or not any((tmp_path / "circles-state").iterdir())

        # Stripe, signed by stripe-python, addressed to the circle in either form of its key.
        for path_key in (circle.pubkey, circle.uncompressed):
            body = encode(stripe_event(f"evt_{path_key[:8]}", note="from the Rust era"))
            status, answer = _http(port, f"/webhooks/stripe/{path_key}", body, stripe_headers(body))
            assert status == 200, answer
            task = _completed(redis_client, json.loads(answer)["task_id"])
            assert task["status"] == "completed"
            assert (tmp_path / f"{json.loads(answer)['task_id']}.out").read_bytes() == body
            assert task["circle"] == circle.pubkey
        body = encode(stripe_event("evt_wrong_secret"))
        status, _ = _http(port, f"/webhooks/stripe/{circle.pubkey}", body, stripe_headers(body, STRIPE_SECRET_OLD))
        assert status == 401
        body = encode(idenfy_callback("scan-rust-era"))
        status, answer = _http(port, f"/webhooks/idenfy/{circle.uncompressed}", body, idenfy_headers(body))
        assert status == 200, answer
        assert redis_client.hgetall(f"circles:task:{json.loads(answer)['task_id']}")["script"] == webhooks.IDENFY_SCRIPT

        # A WebSocket client on /{uncompressed key} is in the circle served as compressed, and plays there.
        with connect(f"ws://127.0.0.1:{port}/{circle.uncompressed}") as ws:
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey
            nonce = request(ws, "fetch_nonce", {"pubkey": user.uncompressed})["result"]["nonce"]
            reply = request(ws, "authenticate", {"pubkey": user.uncompressed, "signature": user.eth_sign(nonce)})
            assert reply["result"]["authenticated"] is True
            reply = request(ws, "play", {"script": 'printf "%s %s" "$CONTEXT_ID" "$CALLER_ID"'})
            assert _output(reply) == f"{circle.pubkey} {user.pubkey}"
        # Without the upgrade, both forms get the same answer from the Site (not the 404 of a non-circle).
        compressed, uncompressed = _http(port, f"/{circle.pubkey}"), _http(port, f"/{circle.uncompressed}")
        assert compressed == uncompressed and compressed[0] != 404
        assert _http(port, f"/{circle.uncompressed}00")[0] == 404
    server_log, worker_log = server.output, worker.output
    assert "configuration: Redis URL from $REDIS_URL" in server_log
    assert "configuration: Stripe webhook secrets from $STRIPE_WEBHOOK_SECRET" in server_log
    assert "configuration: iDenfy webhook secrets from $IDENFY_WEBHOOK_SECRET" in server_log
    assert "configuration: Redis URL from $REDIS_URL" in worker_log
    for secret in (STRIPE_SECRET, IDENFY_SECRET):
        assert secret not in server_log + worker_log
    assert "Traceback" not in server_log + worker_log


def test_our_names_win_and_the_log_says_the_others_were_ignored(tmp_path, redis_server, monkeypatch):
    circle = Key()
    monkeypatch.setenv(STRIPE_ENV, STRIPE_SECRET)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET_OLD)
    monkeypatch.setenv("IDENFY_WEBHOOK_SECRET", IDENFY_SECRET)  # alone: used
    monkeypatch.setenv(REDIS_URL_ENV, redis_server.url)
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")  # nothing listens there
    with twistd(["--listen", "tcp:0:interface=127.0.0.1", "-k", circle.pubkey], tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")  # through $CIRCLES_REDIS_URL: $REDIS_URL leads nowhere
        body = encode(stripe_event("evt_ours"))
        assert _http(port, f"/webhooks/stripe/{circle.pubkey}", body, stripe_headers(body, STRIPE_SECRET))[0] == 200
        body = encode(stripe_event("evt_theirs"))
        assert _http(port, f"/webhooks/stripe/{circle.pubkey}", body, stripe_headers(body, STRIPE_SECRET_OLD))[0] == 401
        body = encode(idenfy_callback("scan-theirs"))
        assert _http(port, f"/webhooks/idenfy/{circle.pubkey}", body, idenfy_headers(body))[0] == 200
    log = server.output
    assert "configuration: Redis URL from $CIRCLES_REDIS_URL ($REDIS_URL also set: ignored)" in log
    assert ("configuration: Stripe webhook secrets from $CIRCLES_STRIPE_WEBHOOK_SECRET "
            "($STRIPE_WEBHOOK_SECRET also set: ignored)") in log
    assert "configuration: iDenfy webhook secrets from $IDENFY_WEBHOOK_SECRET" in log
    assert STRIPE_SECRET not in log and STRIPE_SECRET_OLD not in log and IDENFY_SECRET not in log
    assert "hunter2" not in log and "127.0.0.1:1/" not in log


def test_a_dotenv_file_fills_in_below_the_environment(tmp_path, redis_server, monkeypatch):
    circle = Key()
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"# as the Rust server read it\nREDIS_URL={redis_server.url}\n"
                      f"STRIPE_WEBHOOK_SECRET={STRIPE_SECRET_OLD}\nexport IDENFY_WEBHOOK_SECRET='{IDENFY_SECRET}'\n")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET)  # the environment wins over the file
    with twistd(["--listen", "tcp:0:interface=127.0.0.1", "-k", circle.pubkey], tmp_path) as server, \
            twistd(["-k", circle.pubkey, *SHELL_WORKER], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        body = encode(stripe_event("evt_env"))
        assert _http(port, f"/webhooks/stripe/{circle.pubkey}", body, stripe_headers(body, STRIPE_SECRET))[0] == 200
        body = encode(stripe_event("evt_file"))
        assert _http(port, f"/webhooks/stripe/{circle.pubkey}", body, stripe_headers(body, STRIPE_SECRET_OLD))[0] == 401
        body = encode(idenfy_callback("scan-file"))
        assert _http(port, f"/webhooks/idenfy/{circle.pubkey}", body, idenfy_headers(body))[0] == 200
    log = server.output + worker.output
    assert f"configuration: Redis URL from REDIS_URL in {dotenv}" in server.output
    assert f"configuration: Redis URL from REDIS_URL in {dotenv}" in worker.output
    assert "configuration: Stripe webhook secrets from $STRIPE_WEBHOOK_SECRET\n" in server.output
    assert f"configuration: iDenfy webhook secrets from IDENFY_WEBHOOK_SECRET in {dotenv}" in server.output
    assert STRIPE_SECRET not in log and STRIPE_SECRET_OLD not in log and IDENFY_SECRET not in log


def test_a_malformed_dotenv_stops_start_up_with_one_line(tmp_path):
    (tmp_path / ".env").write_text("REDIS_URL=redis://localhost:6379/0\nSTRIPE_WEBHOOK_SECRET=whsec_a b\n")
    result = run_twistd_to_exit(["-k", Key().pubkey], tmp_path)
    assert result.returncode != 0
    assert f"circles: {tmp_path / '.env'}, line 2: the value of STRIPE_WEBHOOK_SECRET" in result.stderr
    assert "whsec_a" not in result.stdout + result.stderr and "Traceback" not in result.stderr
