"""The contracts one server speaks: ours, the original circles server's (``--api circles``) and
its hero generation's (``--api hero``).

Real processes: ``twistd circles`` and ``twistd circles-worker`` (the tiny engine), and clients
as their users run them: the ``websockets`` library for a circles-era client written without
this project's code, the ``circles`` command and the Python client for ours. Then each contract
as one object (circles.server.session.contracts): its document against its method table and
against what its sessions answer, in memory; and a fourth contract added in memory, over a
real WebSocket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import attrs
import jsonschema
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from websockets.sync.client import connect
from zope.interface import implementer

from circles.backend.scripts import IScriptRunner, ScriptFailed
from circles.client import RPCError
from circles.client import connect as connect_client
from circles.common.jsonrpc import INVALID_PARAMS, Methods
from circles.common.wire import (
    APIS,
    AUTH_FAILED,
    AUTH_REQUIRED,
    EXECUTION_ERROR,
    GATEWAY,
    JOB_NOT_FOUND,
    JOB_STATE,
    SCRIPT_FAILED,
    SUBPROTOCOLS,
)
from circles.protocol import CircleFactory
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.session.contracts import CONTRACTS
from circles.server.session.contracts.base import Registry
from circles.server.session.methods import Sessions
from circles.service import build_site

from ..inmemory import replied, session_layer
from ..support import ROOT, Key, request, run_twistd_to_exit, twistd
from .test_playground import CHROMIUM, run_browser

CIRCLES = str(Path(sys.executable).with_name("circles"))
OURS, ERA, HERO = (CONTRACTS[api].subprotocol for api in ("gateway", "circles", "hero"))


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
    assert described == CONTRACTS["circles"].document() == _get_json(port, "/openrpc.json")
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
        assert described == CONTRACTS["hero"].document() and described["info"]["x-api"] == "hero"
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
    assert described == CONTRACTS["gateway"].document() == json.loads((ROOT / "openrpc.json").read_text())
    # GET /openrpc.json is the server's default, not what this connection asked for
    assert _get_json(port, "/openrpc.json")["info"]["x-api"] == "circles"


def test_a_default_server_speaks_ours_and_the_circles_era_contract_on_request(gateway_server):
    url, port, _ = gateway_server
    chosen, described = _our_session(url)  # no subprotocol: the server's default, ours
    assert chosen is None and described["info"]["x-api"] == "gateway"
    assert _get_json(port, "/openrpc.json") == CONTRACTS["gateway"].document()
    # the client's order of preference decides; unknown names are passed over
    user = Key()
    with connect(url, subprotocols=["graphql-ws", ERA, OURS]) as ws:
        assert ws.subprotocol == ERA
        nonce = request(ws, "fetch_nonce", [user.pubkey], 1)["result"]["nonce"]
        assert request(ws, "authenticate", [user.pubkey, user.eth_sign(nonce)], 2)["result"] == {"authenticated": True}
        assert _play(ws, "6 * 7", 3)["result"].strip() == "42"
        assert request(ws, "rpc.discover", None, 4)["result"] == CONTRACTS["circles"].document()
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
    assert json.loads(discovered.stdout) == CONTRACTS["gateway"].document()


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
    for api in APIS:
        document = CONTRACTS[api].document()
        validator.validate(document)
        assert document["info"]["x-api"] == api and document["info"]["x-subprotocol"] == SUBPROTOCOLS[api]
        # every error a method names is defined
        defined = {f"#/components/errors/{name}" for name in document["components"]["errors"]}
        for method in document["methods"]:
            assert {ref["$ref"] for ref in method["errors"]} <= defined, (api, method["name"])


def negotiate(offered, default: str) -> tuple:
    """The registry's choice, by name: (the contract's, the subprotocol answered)."""
    contract, subprotocol = CONTRACTS.negotiate(offered, CONTRACTS[default])
    return contract.name, subprotocol


def test_subprotocol_choice():
    assert negotiate([], "circles") == ("circles", None)
    assert negotiate(["x", OURS], "circles") == ("gateway", OURS)
    assert negotiate([ERA, OURS], "gateway") == ("circles", ERA)
    assert negotiate(["x"], "gateway") == ("gateway", None)


def test_the_playground_offers_our_subprotocol():
    page = (ROOT / "circles/server/http/playground/playground.js").read_text()
    assert f"const SUBPROTOCOL = '{OURS}';" in page and "new WebSocket(url, [SUBPROTOCOL])" in page


def test_an_unknown_api_is_refused(tmp_path):
    refused = run_twistd_to_exit(["--api", "rust", "--port", "0"], tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "'rust' is not one of gateway, circles, hero" in refused.stderr
    with pytest.raises(ValueError):
        Config(api="rust")


# --- each contract, one object: its method table, its document, the registry ---------------------------


def test_the_registry_holds_every_contract_the_wire_names():
    # Config(api=...) takes wire.APIS; each has its contract here, asked for by its subprotocol.
    assert CONTRACTS.names == APIS
    assert {contract.name: contract.subprotocol for contract in CONTRACTS} == SUBPROTOCOLS
    assert [CONTRACTS[name].name for name in APIS] == list(APIS)
    with pytest.raises(KeyError):
        CONTRACTS["rust"]


@pytest.mark.parametrize("contract", list(CONTRACTS), ids=lambda contract: contract.name)
def test_each_document_lists_exactly_its_method_table(contract):
    document = contract.document()
    assert document["info"]["x-api"] == contract.name and document["info"]["x-subprotocol"] == contract.subprotocol
    assert sorted(m["name"] for m in document["methods"]) == sorted(contract.methods)
    for described in document["methods"]:
        documented = [(p["name"], p.get("required", False)) for p in described["params"]]
        assert documented == [(p.name, p.required) for p in contract.methods.get(described["name"]).params]


def test_two_contracts_may_not_share_a_name_or_a_subprotocol():
    gateway = CONTRACTS[GATEWAY]
    with pytest.raises(ValueError):
        Registry(gateway, attrs.evolve(gateway, name="other"))
    with pytest.raises(ValueError):
        Registry(gateway, attrs.evolve(gateway, subprotocol="other.v1"))


# --- each contract answers what its document describes (in memory) -----------------------------------

CIRCLE = Key().pubkey


@implementer(IScriptRunner)
class _AtOnce:
    """Plays answered at once: the script ``fail`` fails (after printing), any other outputs "20"."""

    def is_connected(self) -> bool:
        return True

    def run(self, request) -> Deferred:
        if request.script == "fail":
            return fail(ScriptFailed("division by zero", "printed first\n"))
        return succeed("20")


def _call(session, method: str, params=None) -> dict:
    message = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        message["params"] = params
    return json.loads(replied(session.answer(json.dumps(message))))


@pytest.mark.parametrize("contract", list(CONTRACTS), ids=lambda contract: contract.name)
def test_each_contract_answers_the_shapes_and_errors_its_document_describes(contract):
    document = contract.document()
    described = {m["name"]: m for m in document["methods"]}
    errors = {e["code"]: (name, e["message"]) for name, e in document["components"]["errors"].items()}
    session = session_layer(Gateway(Config(auth_required=True), Clock(), _AtOnce())).open(CIRCLE, contract=contract)
    answered = set()

    def result(method: str, params=None):
        reply = _call(session, method, params)
        # Within the document: its schemas may name the document's own (#/components/schemas/...).
        jsonschema.validate(reply["result"], {**described[method]["result"]["schema"],
                                              "components": document["components"]})
        answered.add(method)
        return reply["result"]

    def refused(method: str, params, code: int) -> None:
        error = _call(session, method, params)["error"]
        name, message = errors[error["code"]]  # a code the document defines, named by the method
        assert error["code"] == code and {"$ref": f"#/components/errors/{name}"} in described[method]["errors"]
        assert error["message"] == message or error["message"].startswith(message + ": "), (error, message)

    user = Key()
    refused("play", {"script": "1"}, AUTH_REQUIRED)
    nonce = result("fetch_nonce", {"pubkey": user.pubkey})
    nonce = nonce if isinstance(nonce, str) else nonce["nonce"]
    refused("authenticate", {"pubkey": user.pubkey, "signature": Key().eth_sign(nonce)}, AUTH_FAILED)
    nonce = result("fetch_nonce", {"pubkey": user.pubkey})
    nonce = nonce if isinstance(nonce, str) else nonce["nonce"]
    result("authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)})
    assert result("whoami")["pubkey"] == user.pubkey
    result("play", {"script": "let x = 10; x * 2"})
    refused("play", {"script": "fail"}, EXECUTION_ERROR if contract.name == "circles" else SCRIPT_FAILED)
    if "run_job" in contract.methods:  # the hero contract's jobs methods
        job = result("create_job", {"job": {"script": "let x = 10; x * 2", "script_type": "rhai"}})
        refused("get_job_output", [job], JOB_STATE)
        assert result("start_job", [job]) == {"success": True}
        assert result("get_job_status", [job])["status"] == "finished"
        assert result("get_job_output", [job]) == "20" and result("get_job_logs", [job]) == ["20"]
        refused("start_job", [job], JOB_STATE)
        refused("stop_job", [job], JOB_STATE)
        assert result("run_job", {"script": "1", "script_type": "rhai"}) == "20"
        refused("run_job", {"script": "fail", "script_type": "rhai"}, SCRIPT_FAILED)
        refused("create_job", {"job": {"script": "1", "script_type": "python"}}, INVALID_PARAMS)
        waiting = result("create_job", {"job": {"script": "1", "script_type": "rhai", "prerequisites": [job]}})
        assert result("stop_job", [waiting]) == {"success": True}
        assert result("list_jobs")["total"] == 2
        assert result("delete_job", [job]) == {"success": True}
        refused("get_job_status", [job], JOB_NOT_FOUND)
        assert result("clear_all_jobs") == {"success": True, "deleted": 1}
    assert _call(session, "rpc.discover")["result"] == document  # its schema is the OpenRPC meta-schema
    assert answered | {"rpc.discover"} == set(contract.methods)


# --- a fourth contract: one object, one entry in the registry ------------------------------------------

TINY_METHODS = Methods()


@TINY_METHODS.add("ping")
def _ping(session) -> str:
    return "pong"


@TINY_METHODS.add("rpc.discover")
def _discover(session) -> dict:
    return session.contract.document()


def _tiny_document(document: dict) -> None:
    document["info"]["title"] = "tiny"
    document["methods"] = [m for m in document["methods"] if m["name"] == "rpc.discover"] + [
        {"name": "ping", "params": [], "result": {"name": "pong", "schema": {"const": "pong"}}, "errors": []}]


# What a module of its own under circles/server/session/contracts/ would hold.
TINY = attrs.evolve(CONTRACTS[GATEWAY], name="tiny", subprotocol="circles-tiny.v1", methods=TINY_METHODS,
                    document_changes=_tiny_document)


def _tiny_session(url: str, subprotocols) -> tuple:
    with connect(url, subprotocols=subprotocols) as ws:
        return ws.subprotocol, [request(ws, method, None, 1) for method in ("ping", "whoami", "rpc.discover")]


@pytest_twisted.ensureDeferred
async def test_a_fourth_contract_takes_its_object_and_its_entry_in_the_registry():
    """The server as the composition root wires it, with one more contract in its registry: a
    client that offers its subprotocol gets it (its own method table and document), the others
    what they got before."""
    registry = Registry(*CONTRACTS, TINY)
    assert [contract.name for contract in registry] == [*APIS, "tiny"]
    assert sorted(m["name"] for m in TINY.document()["methods"]) == sorted(TINY_METHODS) == ["ping", "rpc.discover"]
    gateway = Gateway(Config(), reactor, _AtOnce())
    sessions = Sessions(gateway, registry)
    assert sessions.negotiate(["x", "circles-tiny.v1", OURS]) == (TINY, "circles-tiny.v1")
    port = reactor.listenTCP(0, build_site(CircleFactory(sessions), reactor), interface="127.0.0.1")
    try:
        url = f"ws://127.0.0.1:{port.getHost().port}/{CIRCLE}"
        chosen, (ping, whoami, described) = await threads.deferToThread(_tiny_session, url, ["circles-tiny.v1"])
        assert chosen == "circles-tiny.v1" and ping["result"] == "pong"
        assert whoami["error"]["code"] == -32601  # not in its method table
        assert described["result"] == TINY.document() and described["result"]["info"]["x-api"] == "tiny"
        chosen, (ping, whoami, described) = await threads.deferToThread(_tiny_session, url, None)
        assert chosen is None and ping["error"]["code"] == -32601  # the default: ours
        assert whoami["result"]["circle"] == CIRCLE and described["result"] == CONTRACTS[GATEWAY].document()
    finally:
        await port.stopListening()
    assert 'circles_requests_total{method="ping",outcome="ok"} 1.0' in gateway.metrics.exposition().decode()
