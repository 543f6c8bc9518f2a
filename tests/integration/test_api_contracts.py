"""The two contracts one server speaks: the original circles server's (``--api circles``) and ours.

Real processes: ``twistd circles`` and ``twistd circles-worker`` (the tiny engine), and clients
as their users run them: the ``websockets`` library for a circles-era client written without
this project's code, the ``circles`` command and the Python client for ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from websockets.sync.client import connect

from circles.server.session import openrpc
from circles.client import RPCError
from circles.client import connect as connect_client
from circles.server.config import Config

from ..support import ROOT, Key, request, run_twistd_to_exit, twistd
from .test_playground import CHROMIUM, run_browser

CIRCLES = str(Path(sys.executable).with_name("circles"))
OURS, ERA, HERO = (openrpc.SUBPROTOCOLS[api] for api in (openrpc.GATEWAY, openrpc.CIRCLES, openrpc.HERO))


def _serve(tmp_path_factory, api: str):
    directory = tmp_path_factory.mktemp(f"api-{api}")
    circle = Key()
    args = ["--auth", "--api", api, "--playground", "-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"]
    with twistd(args, directory) as server, \
            twistd(["-k", circle.pubkey, "--engine", "circles.worker.tiny_engine:run"], directory,
                   plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        yield f"ws://127.0.0.1:{port}/{circle.pubkey}", port, server


@pytest.fixture(scope="module")
def era_server(tmp_path_factory):
    """A server run as a circles deployment replacing the Rust server: --api circles."""
    yield from _serve(tmp_path_factory, "circles")


@pytest.fixture(scope="module")
def hero_server(tmp_path_factory):
    """A server for clients of the hero generation: --api hero."""
    yield from _serve(tmp_path_factory, "hero")


@pytest.fixture(scope="module")
def gateway_server(tmp_path_factory):
    """A server with the default contract (ours)."""
    yield from _serve(tmp_path_factory, "gateway")


def _get_json(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.load(response)


def _play(ws, script: str, id_=1) -> dict:
    return request(ws, "play", {"script": script}, id_)


def test_a_circles_era_client_session_replayed(era_server):
    """What a client written for the Rust circles server sends and expects, request by request:
    no subprotocol, `credentials` objects, a string from play, -32000/-32001/-32002."""
    url, port, server = era_server
    user, stranger = Key(), Key()
    with connect(url) as ws:  # offers no subprotocol, as such a client does
        assert ws.response.headers.get("Sec-WebSocket-Protocol") is None
        # play before authenticating
        refused = _play(ws, "40 + 2", 1)
        assert refused == {"jsonrpc": "2.0", "id": 1,
                           "error": {"code": -32001, "message": "Authentication Required"}}
        # fetch_nonce {pubkey} -> NonceResponse {nonce, expires_at}; keys often uncompressed
        nonce_response = request(ws, "fetch_nonce", {"pubkey": user.uncompressed}, 2)["result"]
        assert set(nonce_response) == {"nonce", "expires_at"} and isinstance(nonce_response["expires_at"], int)
        # a signature by another key: -32002 Invalid Credentials
        bad = request(ws, "authenticate", {"credentials": {"pubkey": user.uncompressed,
                                                           "signature": stranger.eth_sign(nonce_response["nonce"])}}, 3)
        assert bad["error"]["code"] == -32002 and bad["error"]["message"] == "Invalid Credentials"
        assert "signature" in bad["error"]["data"]  # why, for a person reading it
        # the real signature: {authenticated: true}, nothing more
        nonce = request(ws, "fetch_nonce", {"pubkey": user.uncompressed}, 4)["result"]["nonce"]
        assert request(ws, "authenticate", {"credentials": {"pubkey": user.uncompressed,
                                                            "signature": user.eth_sign(nonce)}}, 5) == \
            {"jsonrpc": "2.0", "id": 5, "result": {"authenticated": True}}
        # play {script} -> the output, a string
        played = _play(ws, "let x = 10; x * 2", 6)
        assert isinstance(played["result"], str) and played["result"].strip() == "20"
        assert _play(ws, "CALLER_ID", 7)["result"].strip() == user.pubkey
        # a failing script: -32000 Execution Error, the worker's error as data
        failed = _play(ws, "let y = 1 / 0;", 8)
        assert failed["error"]["code"] == -32000 and failed["error"]["message"] == "Execution Error"
        assert "division by zero" in failed["error"]["data"]
        # the contract this connection gets, described to it
        described = request(ws, "rpc.discover", None, 9)["result"]
    assert described == openrpc.document(openrpc.CIRCLES) == _get_json(port, "/openrpc.json")
    assert described["info"]["x-api"] == "circles"
    play_doc = next(m for m in described["methods"] if m["name"] == "play")
    assert play_doc["result"]["schema"]["type"] == "string"
    errors = {e["code"]: e["message"] for e in described["components"]["errors"].values()}
    assert errors[-32000] == "Execution Error" and errors[-32001] == "Authentication Required"
    assert errors[-32002] == "Invalid Credentials" and -32005 not in errors
    assert "Traceback" not in server.output


def test_a_hero_client_session_replayed(hero_server, gateway_server):
    """The hero generation's documented shapes: fetch_nonce -> the nonce string, authenticate
    {pubkey, signature} -> true, play -> {output} ("20" for `let x = 10; x * 2`); on a server
    run with --api hero, and on a default one for a client offering its subprotocol."""
    for url, subprotocols in ((hero_server[0], None), (gateway_server[0], [HERO])):
        user = Key()
        with connect(url, subprotocols=subprotocols) as ws:
            nonce = request(ws, "fetch_nonce", {"pubkey": user.uncompressed}, 1)["result"]
            assert isinstance(nonce, str) and len(nonce) == 32
            assert request(ws, "authenticate", {"pubkey": user.uncompressed, "signature": user.eth_sign(nonce)}, 2) \
                == {"jsonrpc": "2.0", "id": 2, "result": True}
            assert _play(ws, "let x = 10; x * 2", 3)["result"]["output"].strip() == "20"
            assert _play(ws, "1 / 0", 4)["error"]["code"] == -32005
            described = request(ws, "rpc.discover", None, 5)["result"]
        assert described == openrpc.document(openrpc.HERO) and described["info"]["x-api"] == "hero"
    assert _get_json(hero_server[1], "/openrpc.json")["info"]["x-api"] == "hero"


def _our_session(url: str, subprotocols=None):
    """Our contract, call by call; what rpc.discover says on that connection."""
    user, stranger = Key(), Key()
    with connect(url, subprotocols=subprotocols) as ws:
        refused = _play(ws, "40 + 2", 1)
        assert refused["error"]["code"] == -32001
        assert refused["error"]["message"].startswith("Authentication required: call fetch_nonce")
        nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey}, 2)["result"]["nonce"]
        bad = request(ws, "authenticate", {"pubkey": user.pubkey, "signature": stranger.eth_sign(nonce)}, 3)
        assert bad["error"]["code"] == -32002 and bad["error"]["message"].startswith("Authentication failed: ")
        nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey}, 4)["result"]["nonce"]
        assert request(ws, "authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)}, 5)["result"] \
            == {"authenticated": True, "pubkey": user.pubkey}
        played = _play(ws, "let x = 10; x * 2", 6)["result"]
        assert set(played) == {"output"} and played["output"].strip() == "20"
        failed = _play(ws, "let y = 1 / 0;", 7)["error"]
        assert (failed["code"], failed["message"]) == (-32005, "Script failed") and "division by zero" in failed["data"]
        return ws.response.headers.get("Sec-WebSocket-Protocol"), request(ws, "rpc.discover", None, 8)["result"]


def test_our_contract_on_a_circles_era_server_for_clients_that_ask_for_it(era_server):
    url, port, _ = era_server
    chosen, described = _our_session(url, [OURS])
    assert chosen == OURS
    assert described == openrpc.document(openrpc.GATEWAY) == json.loads((ROOT / "openrpc.json").read_text())
    # GET /openrpc.json is the server's default, not what this connection asked for
    assert _get_json(port, "/openrpc.json")["info"]["x-api"] == "circles"


def test_a_default_server_speaks_ours_and_the_circles_era_contract_on_request(gateway_server):
    url, port, _ = gateway_server
    chosen, described = _our_session(url)  # no subprotocol: the server's default, ours
    assert chosen is None and described["info"]["x-api"] == "gateway"
    assert _get_json(port, "/openrpc.json") == openrpc.document(openrpc.GATEWAY)
    # the client's order of preference decides; unknown names are passed over
    user = Key()
    with connect(url, subprotocols=["graphql-ws", ERA, OURS]) as ws:
        assert ws.subprotocol == ERA
        nonce = request(ws, "fetch_nonce", [user.pubkey], 1)["result"]["nonce"]
        assert request(ws, "authenticate", [user.pubkey, user.eth_sign(nonce)], 2)["result"] == {"authenticated": True}
        assert _play(ws, "6 * 7", 3)["result"].strip() == "42"
        assert request(ws, "rpc.discover", None, 4)["result"] == openrpc.document(openrpc.CIRCLES)
    # only names we do not know: no subprotocol answered, the default contract
    with connect(url, subprotocols=["graphql-ws"]) as ws:
        assert ws.subprotocol is None
        assert request(ws, "rpc.discover", None, 1)["result"]["info"]["x-api"] == "gateway"


def _circles_command(*args, env=None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **(env or {}))
    return subprocess.run([CIRCLES, *args], capture_output=True, text=True, timeout=120, env=environment)


def test_our_command_against_a_circles_era_server(era_server, tmp_path):
    url, _, _ = era_server
    made = _circles_command("keygen", "--out", str(tmp_path / "me.key"))
    assert made.returncode == 0, made.stderr
    pubkey = made.stdout.strip()
    ok = _circles_command("play", url, "--key-file", str(tmp_path / "me.key"), 'print("hi " + CALLER_ID); 6 * 7')
    assert (ok.returncode, ok.stdout.split()) == (0, ["hi", pubkey, "42"]), ok.stderr
    as_json = _circles_command("play", url, "--key-file", str(tmp_path / "me.key"), "--json", "6 * 7")
    assert json.loads(as_json.stdout)["output"].strip() == "42"
    failed = _circles_command("play", url, "--key-file", str(tmp_path / "me.key"), "--json", "1 / 0")
    assert failed.returncode == 1 and json.loads(failed.stdout)["error"]["code"] == -32005
    anonymous = _circles_command("play", url, "--json", "1")
    assert json.loads(anonymous.stdout)["error"]["message"].startswith("Authentication required: ")
    discovered = _circles_command("discover", url)
    assert json.loads(discovered.stdout) == openrpc.document(openrpc.GATEWAY)


@pytest_twisted.ensureDeferred
async def test_the_python_client_against_a_circles_era_server(era_server):
    url, _, _ = era_server
    client = await connect_client(url, reactor=reactor)
    try:
        user = Key()
        await client.authenticate(user.private.secret, scheme="eth")
        assert (await client.play("let x = 10; x * 2")).strip() == "20"
        with pytest.raises(RPCError) as failed:
            await client.play("1 / 0")
        assert failed.value.code == -32005
        assert (await client.discover())["info"]["x-api"] == "gateway"
    finally:
        await client.close()


@pytest.mark.skipif(not shutil.which("node") or not os.path.exists(CHROMIUM), reason="needs node and chromium")
def test_the_playground_on_a_circles_era_server(era_server):
    """The page offers our subprotocol, so it reads {output} and -32005 where the server's
    default would answer a string and -32000."""
    url, port, server = era_server
    user = Key()
    circle = url.rsplit("/", 1)[1]
    report = run_browser(f"http://127.0.0.1:{port}/playground/?circle={circle}", "playground-circles-era.png", user)
    assert report["pubkey"] == user.pubkey
    assert report["output"].split() == ["hello,", user.pubkey, "42"]
    assert "-32005" in report["error"] and "division by zero" in report["error"]
    assert report["errorMessage"] == "The script failed."
    assert not [line for line in report["console"] if line.startswith(("error", "pageerror"))], report["console"]


def test_the_circles_era_document_is_valid_openrpc():
    from .test_openrpc import official_validator

    validator = official_validator()
    for api in openrpc.APIS:
        document = openrpc.document(api)
        validator.validate(document)
        assert document["info"]["x-api"] == api and document["info"]["x-subprotocol"] == openrpc.SUBPROTOCOLS[api]
        # every error a method names is defined
        defined = {f"#/components/errors/{name}" for name in document["components"]["errors"]}
        for method in document["methods"]:
            assert {ref["$ref"] for ref in method["errors"]} <= defined, (api, method["name"])


def test_subprotocol_choice():
    assert openrpc.negotiate([], "circles") == ("circles", None)
    assert openrpc.negotiate(["x", OURS], "circles") == ("gateway", OURS)
    assert openrpc.negotiate([ERA, OURS], "gateway") == ("circles", ERA)
    assert openrpc.negotiate(["x"], "gateway") == ("gateway", None)


def test_the_playground_offers_our_subprotocol():
    page = (ROOT / "circles/server/http/playground/playground.js").read_text()
    assert f"const SUBPROTOCOL = '{OURS}';" in page and "new WebSocket(url, [SUBPROTOCOL])" in page


def test_an_unknown_api_is_refused(tmp_path):
    refused = run_twistd_to_exit(["--api", "rust", "--port", "0"], tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "'rust' is not one of gateway, circles, hero" in refused.stderr
    with pytest.raises(ValueError):
        Config(api="rust")
