"""openrpc.json against the official OpenRPC meta-schema, and against the methods we serve."""

import json
import subprocess

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from circles.common.wire import GATEWAY
from circles.server.session.contracts import CONTRACTS
from circles.server.session.methods import methods

from .support import ROOT

DUMP_META_SCHEMAS = (
    "process.stdout.write(JSON.stringify({openrpc: require('@open-rpc/meta-schema').openrpcDocument,"
    " jsonSchema: require('@json-schema-tools/meta-schema').default}))"
)


def official_validator() -> jsonschema.Draft7Validator:
    """The OpenRPC meta-schema from npm (package.json; the test set-up runs `npm ci`)."""
    result = subprocess.run(["node", "-e", DUMP_META_SCHEMAS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, "npm packages missing: run `npm ci` in the repository\n" + result.stderr
    schemas = json.loads(result.stdout)
    json_schema = Resource.from_contents(schemas["jsonSchema"], default_specification=DRAFT7)
    registry = Registry().with_resources([("https://meta.json-schema.tools", json_schema),
                                          ("https://meta.json-schema.tools/", json_schema)])
    jsonschema.Draft7Validator.check_schema(schemas["openrpc"])
    return jsonschema.Draft7Validator(schemas["openrpc"], registry=registry)


@pytest.fixture(scope="module")
def document():
    with open(ROOT / "openrpc.json", encoding="utf-8") as f:
        return json.load(f)


def test_document_is_valid_openrpc(document):
    validator = official_validator()
    validator.validate(document)
    # Broken documents must fail, or the check above proves nothing.
    assert list(validator.iter_errors(dict(document, methods=[{"name": "play"}])))
    bad_param = json.loads(json.dumps(document))
    bad_param["methods"][0]["params"][0]["schema"] = {"type": 5}
    assert list(validator.iter_errors(bad_param))


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
