"""The API contracts: the OpenRPC documents describing the JSON-RPC API, the application error
codes they name, and which contract a connection gets.

Two contracts are served (README, "API"): ours (``gateway``: ``openrpc.json``) and the original
circles server's (``circles``: the circles-era result shapes and error codes, for clients
written against the Rust server). A server has a default (``--api``); a client picks one per
connection by offering its WebSocket subprotocol (our client, CLI and playground offer ours).

``openrpc.json`` at the repository root is the one source; the package carries it (a symlink
in the tree, a copy in built wheels) so ``rpc.discover`` can answer with it when installed. The
circles-era document is made from it here, by the changes that contract makes, so the two
cannot drift apart on what they share.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Optional, Sequence

from circles.common.wire import (AUTH_REQUIRED, AUTH_FAILED, SCRIPT_TIMEOUT, BACKEND_UNAVAILABLE, SCRIPT_FAILED, TOO_MANY_REQUESTS, REPLY_TOO_LARGE, NO_WORKER, NOT_A_MEMBER, EXECUTION_ERROR, GATEWAY, CIRCLES, HERO, APIS, DEFAULT_API, SUBPROTOCOLS)

_API_OF_SUBPROTOCOL = {name: api for api, name in SUBPROTOCOLS.items()}

# The circles-era messages of the three codes that contract names.
CIRCLES_MESSAGES = {EXECUTION_ERROR: "Execution Error", AUTH_REQUIRED: "Authentication Required",
                    AUTH_FAILED: "Invalid Credentials"}


def negotiate(offered: Sequence[str], default: str) -> "tuple[str, Optional[str]]":
    """(the contract a connection gets, the subprotocol to answer with) for the subprotocols a
    client offered: the first one we know, in the client's order of preference; else the
    server's default and no subprotocol (a client that offers none, or only unknown ones)."""
    for name in offered:
        api = _API_OF_SUBPROTOCOL.get(name)
        if api is not None:
            return api, name
    return default, None


@lru_cache(maxsize=None)
def document_text(api: str = GATEWAY) -> str:
    text = resources.files("circles").joinpath("openrpc.json").read_text("utf-8")
    if api == GATEWAY:
        return text
    if api in (CIRCLES, HERO):
        made = (_circles_era if api == CIRCLES else _hero)(json.loads(text))
        return json.dumps(made, indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown API {api!r} (one of {', '.join(APIS)})")


def document(api: str = GATEWAY) -> dict:
    """A fresh copy of the document of ``api`` (callers may not mutate a shared one)."""
    return json.loads(document_text(api))


def _method(doc: dict, name: str) -> dict:
    return next(m for m in doc["methods"] if m["name"] == name)


def _circles_era(ours: dict) -> dict:
    """Our document, changed where the circles-era contract differs (its own OpenRPC
    document, circles docs/openrpc.json, 1.2.6): the results of authenticate and play, and
    the codes and messages of three errors."""
    doc = copy.deepcopy(ours)
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
    doc["info"]["x-api"] = CIRCLES
    doc["info"]["x-subprotocol"] = SUBPROTOCOLS[CIRCLES]
    authenticate = _method(doc, "authenticate")
    authenticate["result"] = {"name": "authenticated", "schema": {
        "type": "object", "required": ["authenticated"],
        "properties": {"authenticated": {"type": "boolean", "description": "true: a failure is the error -32002."}}}}
    play = _method(doc, "play")
    play["result"] = {"name": "output", "schema": {
        "type": "string", "description": "The script's output, as the worker reported it."}}
    errors = doc["components"]["errors"]
    errors["AuthenticationRequired"]["message"] = CIRCLES_MESSAGES[AUTH_REQUIRED]
    errors["AuthenticationFailed"]["message"] = CIRCLES_MESSAGES[AUTH_FAILED]
    errors["AuthenticationFailed"]["data"] = "Why: no, expired or used nonce; malformed key or signature; " \
                                             "signature by another key."
    del errors["ScriptFailed"]
    errors["ExecutionError"] = {"code": EXECUTION_ERROR, "message": CIRCLES_MESSAGES[EXECUTION_ERROR],
                                "data": "The worker's error text: the script failed."}
    for method in doc["methods"]:
        for ref in method.get("errors", []):
            if ref.get("$ref") == "#/components/errors/ScriptFailed":
                ref["$ref"] = "#/components/errors/ExecutionError"
    return doc


def _hero(ours: dict) -> dict:
    """Our document, changed where the hero generation's contract differs: fetch_nonce answers
    the nonce itself and authenticate answers true. Its play answers {output}, as ours does; its
    documents name no error codes, so ours are kept."""
    doc = copy.deepcopy(ours)
    doc["info"]["title"] = "circles (hero-generation contract)"
    doc["info"]["description"] = (
        "The JSON-RPC 2.0 API as this gateway serves it to clients of the hero generation of the circles "
        "server: what a connection gets on a server run with --api hero when it offers no WebSocket subprotocol, "
        f"or on any server when it offers {SUBPROTOCOLS[HERO]!r}. It differs from the gateway's own contract "
        f"(subprotocol {SUBPROTOCOLS[GATEWAY]!r}, openrpc.json) in two results: fetch_nonce answers the nonce "
        "string (it expires after the server's --nonce-ttl) and authenticate answers true. play answers "
        "{output}, and the error codes are the gateway's.")
    doc["info"]["x-api"] = HERO
    doc["info"]["x-subprotocol"] = SUBPROTOCOLS[HERO]
    _method(doc, "fetch_nonce")["result"] = {"name": "nonce", "schema": {
        "type": "string", "description": "128-bit random value, hex. Sign exactly this string (UTF-8)."}}
    _method(doc, "authenticate")["result"] = {"name": "authenticated", "schema": {
        "const": True, "description": "true: a failure is the error -32002."}}
    return doc
