"""Ours: the contract ``openrpc.json`` documents (``--api gateway``, subprotocol ``circles-gateway.v1``).

fetch_nonce answers ``{nonce, expires_at}``, authenticate ``{authenticated: true, pubkey}``, play
``{output}``; a script that failed is -32005 "Script failed" (``data``: the worker's error, or
``{error, output}`` when it printed before failing).
"""

from __future__ import annotations

from circles.backend.scripts import ScriptFailed
from circles.common.jsonrpc import RPCError
from circles.common.wire import AUTH_FAILED, AUTH_REQUIRED, GATEWAY, SCRIPT_FAILED, SUBPROTOCOLS
from circles.server.access.nonces import Nonce
from circles.server.session.contracts.base import Contract
from circles.server.session.methods import methods


def nonce_result(nonce: Nonce) -> dict:
    return {"nonce": nonce.value, "expires_at": nonce.expires_at}


def authenticated(signer: str) -> dict:
    return {"authenticated": True, "pubkey": signer}


def play_result(output: str) -> dict:
    return {"output": output}


def auth_required() -> RPCError:
    return RPCError(AUTH_REQUIRED, "Authentication required: call fetch_nonce and authenticate first")


def auth_failed(reason: str) -> RPCError:
    return RPCError(AUTH_FAILED, f"Authentication failed: {reason}")


def script_failed(error: ScriptFailed) -> RPCError:
    if error.output:  # what the script printed before failing goes with the error
        return RPCError(SCRIPT_FAILED, "Script failed", {"error": error.detail, "output": error.output})
    return RPCError(SCRIPT_FAILED, "Script failed", error.detail)


CONTRACT = Contract(
    name=GATEWAY, subprotocol=SUBPROTOCOLS[GATEWAY], methods=methods,
    nonce_result=nonce_result, authenticated=authenticated, play_result=play_result,
    auth_required=auth_required, auth_failed=auth_failed, script_failed=script_failed,
    document_changes=None,  # openrpc.json, as shipped
)
