"""openrpc.json against the official OpenRPC meta-schema, which node reads from the npm packages.

Against the methods we serve: tests/unit/test_openrpc.py."""

import json
import subprocess

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from ..support import ROOT
from ..unit.test_openrpc import document  # noqa: F401 (fixture)

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


def test_document_is_valid_openrpc(document):
    validator = official_validator()
    validator.validate(document)
    # Broken documents must fail, or the check above proves nothing.
    assert list(validator.iter_errors(dict(document, methods=[{"name": "play"}])))
    bad_param = json.loads(json.dumps(document))
    bad_param["methods"][0]["params"][0]["schema"] = {"type": 5}
    assert list(validator.iter_errors(bad_param))
