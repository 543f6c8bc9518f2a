"""The earlier clients' round trip (HTTP nonce, URL authentication, play) against the real plugin
and worker under twistd. The request forms one by one: tests/unit/test_compat.py.
"""

from websockets.sync.client import connect

from ..support import Key, request
from ..unit.test_compat import _fetch, _refused


def test_round_trip_http_nonce_url_auth_then_play(tmp_path):
    """The issue's round trip as an earlier client does it, against the real plugin and worker:
    GET /auth/nonce, sign with eth-account, open the WebSocket with the proof in the URL, play."""
    from ..support import twistd

    circle, user = Key(), Key()
    with twistd(["--auth", "-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--exec", "sh {script_file}"], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        status, body = _fetch(f"http://127.0.0.1:{port}/auth/nonce?public_key={user.pubkey}")
        assert status == 200
        signature = user.eth_sign(body["nonce"])
        url = f"ws://127.0.0.1:{port}/{circle.pubkey}?pubkey={user.pubkey}&sig={signature}&nonce={body['nonce']}"
        with connect(url) as ws:
            reply = request(ws, "play", {"script": 'printf "%s" "$CALLER_ID"'})
            assert reply["result"] == {"output": user.pubkey}
        assert _refused(url) == 401  # the same URL again: replay
        status, body = _fetch(f"http://127.0.0.1:{port}/auth/health")
        assert body["status"] == "healthy" and body["active_nonces"] == 0
    assert signature.removeprefix("0x") not in server.output
