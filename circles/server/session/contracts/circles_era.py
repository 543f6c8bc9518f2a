"""The original circles server's contract (``--api circles``, subprotocol ``circles-era.v1``), for
clients written against the Rust server (its own OpenRPC document: circles docs/openrpc.json, 1.2.6).

It differs from ours in three places: play answers the output as a string, authenticate
``{authenticated: true}``, and a script that fails is -32000 "Execution Error"; -32001 is
"Authentication Required" and -32002 "Invalid Credentials". The codes it does not name keep ours.
"""

from __future__ import annotations

import attrs

from circles.backend.scripts import ScriptFailed
from circles.common.jsonrpc import RPCError
from circles.common.wire import AUTH_FAILED, AUTH_REQUIRED, CIRCLES, EXECUTION_ERROR, GATEWAY, SUBPROTOCOLS
from circles.server.session.contracts import gateway
from circles.server.session.contracts.base import method

# The messages of the three codes this contract names.
MESSAGES = {EXECUTION_ERROR: "Execution Error", AUTH_REQUIRED: "Authentication Required",
            AUTH_FAILED: "Invalid Credentials"}


def authenticated(signer: str) -> dict:
    return {"authenticated": True}


def auth_required() -> RPCError:
    return RPCError(AUTH_REQUIRED, MESSAGES[AUTH_REQUIRED])


def auth_failed(reason: str) -> RPCError:
    return RPCError(AUTH_FAILED, MESSAGES[AUTH_FAILED], reason)


def script_failed(error: ScriptFailed) -> RPCError:
    # Its data is the error text, always (what the script printed is not answered).
    return RPCError(EXECUTION_ERROR, MESSAGES[EXECUTION_ERROR], error.detail)


def document_changes(doc: dict) -> None:
    """Our document, changed where this contract differs: the results of authenticate and play,
    and the codes and messages of three errors."""
    doc["info"]["title"] = "circles (circles-era contract)"
    doc["info"]["description"] = (
        "The JSON-RPC 2.0 API of the original circles server, as this gateway serves it to the clients written "
        "for it: what a connection gets on a server run with --api circles when it offers no WebSocket subprotocol, "
        f"or on any server when it offers {SUBPROTOCOLS[CIRCLES]!r}. It differs from the gateway's own contract "
        f"(subprotocol {SUBPROTOCOLS[GATEWAY]!r}, openrpc.json) in three places: play answers the output as a "
        "string, authenticate answers {authenticated: true}, and a script that fails is -32000 \"Execution "
        "Error\"; -32001 is \"Authentication Required\" and -32002 \"Invalid Credentials\". The other codes "
        "(-32003 script timed out, -32004 backend unavailable, -32006 too many requests, -32007 reply too large, "
        "-32008 no worker serving the circle, -32009 not a member of this circle), "
        "which the original does not name, keep the gateway's meaning. Connect a WebSocket to /{circle_pk} and "
        "send one request, notification or batch per text frame; params by name or by position.")
    method(doc, "authenticate")["result"] = {"name": "authenticated", "schema": {
        "type": "object", "required": ["authenticated"],
        "properties": {"authenticated": {"type": "boolean", "description": "true: a failure is the error -32002."}}}}
    method(doc, "play")["result"] = {"name": "output", "schema": {
        "type": "string", "description": "The script's output, as the worker reported it."}}
    errors = doc["components"]["errors"]
    errors["AuthenticationRequired"]["message"] = MESSAGES[AUTH_REQUIRED]
    errors["AuthenticationFailed"]["message"] = MESSAGES[AUTH_FAILED]
    errors["AuthenticationFailed"]["data"] = "Why: no, expired or used nonce; malformed key or signature; " \
                                             "signature by another key."
    del errors["ScriptFailed"]
    errors["ExecutionError"] = {"code": EXECUTION_ERROR, "message": MESSAGES[EXECUTION_ERROR],
                                "data": "The worker's error text: the script failed."}
    for described in doc["methods"]:
        for ref in described.get("errors", []):
            if ref.get("$ref") == "#/components/errors/ScriptFailed":
                ref["$ref"] = "#/components/errors/ExecutionError"


# Ours, but for what differs: fetch_nonce's result, and every other code, are the same.
CONTRACT = attrs.evolve(
    gateway.CONTRACT, name=CIRCLES, subprotocol=SUBPROTOCOLS[CIRCLES],
    authenticated=authenticated, play_result=None,  # the output itself
    auth_required=auth_required, auth_failed=auth_failed, script_failed=script_failed,
    document_changes=document_changes,
)
