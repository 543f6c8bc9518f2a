"""The contract of the circles server's later generation, hero (``--api hero``, subprotocol
``circles-hero.v1``): fetch_nonce answers the nonce itself and authenticate answers true. Its
play answers ``{output}``, as ours does; its documents name no error codes, so ours are kept.
It has the jobs methods besides ours (:mod:`circles.server.session.jobs`: create_job, run_job...),
with two codes of their own (-32010 job not found, -32011 job state).
"""

from __future__ import annotations

import attrs

from circles.common.jsonrpc import Methods
from circles.common.wire import GATEWAY, HERO, SUBPROTOCOLS
from circles.server.access.nonces import Nonce
from circles.server.session import jobs
from circles.server.session.contracts import gateway
from circles.server.session.contracts.base import method
from circles.server.session.methods import methods


def nonce_result(nonce: Nonce) -> str:
    return nonce.value


def authenticated(signer: str) -> bool:
    return True


def document_changes(doc: dict) -> None:
    """Our document, changed where this contract differs: the results of fetch_nonce and authenticate,
    and the jobs methods."""
    doc["info"]["title"] = "circles (hero-generation contract)"
    doc["info"]["description"] = (
        "The JSON-RPC 2.0 API as this gateway serves it to clients of the hero generation of the circles "
        "server: what a connection gets on a server run with --api hero when it offers no WebSocket subprotocol, "
        f"or on any server when it offers {SUBPROTOCOLS[HERO]!r}. It differs from the gateway's own contract "
        f"(subprotocol {SUBPROTOCOLS[GATEWAY]!r}, openrpc.json) in two results: fetch_nonce answers the nonce "
        "string (it expires after the server's --nonce-ttl) and authenticate answers true. play answers "
        "{output}, and the error codes are the gateway's. It has hero's jobs methods besides (create_job, "
        "start_job, run_job, get_job_status, get_job_output, get_job_logs, list_jobs, stop_job, delete_job, "
        "clear_all_jobs), with two codes of their own: -32010 job not found, -32011 job state does not allow it. "
        "Jobs belong to the key that made them, in the circle of the connection that made them: every jobs "
        "method needs authentication, whatever --auth.")
    method(doc, "fetch_nonce")["result"] = {"name": "nonce", "schema": {
        "type": "string", "description": "128-bit random value, hex. Sign exactly this string (UTF-8)."}}
    method(doc, "authenticate")["result"] = {"name": "authenticated", "schema": {
        "const": True, "description": "true: a failure is the error -32002."}}
    jobs.document(doc)


# Ours, but for what differs: play's result and every error are the same; the jobs methods besides.
CONTRACT = attrs.evolve(
    gateway.CONTRACT, name=HERO, subprotocol=SUBPROTOCOLS[HERO], methods=Methods(methods, jobs.job_methods),
    nonce_result=nonce_result, authenticated=authenticated,
    document_changes=document_changes,
)
