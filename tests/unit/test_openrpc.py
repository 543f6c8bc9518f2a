"""openrpc.json against the methods we serve.

Against the official OpenRPC meta-schema: tests/integration/test_openrpc.py."""

import json

import pytest

from circles.common.wire import GATEWAY
from circles.server.session.contracts import CONTRACTS
from circles.server.session.methods import methods

from ..support import ROOT


@pytest.fixture(scope="module")
def document():
    with open(ROOT / "openrpc.json", encoding="utf-8") as f:
        return json.load(f)


def test_every_served_method_is_documented_and_nothing_else(document):
    assert sorted(m["name"] for m in document["methods"]) == sorted(methods)


def test_documented_params_match_the_code(document):
    for described in document["methods"]:
        method = methods.get(described["name"])
        documented = [(p["name"], p.get("required", False)) for p in described["params"]]
        assert documented == [(p.name, p.required) for p in method.params], described["name"]


def test_documented_error_codes(document):
    codes = {e["code"] for e in document["components"]["errors"].values()}
    assert codes == {-32700, -32600, -32601, -32602, -32603, -32001, -32002, -32003, -32004, -32005, -32006, -32007,
                     -32008, -32009}


def test_package_serves_the_repository_document(document):
    assert CONTRACTS[GATEWAY].document() == document
