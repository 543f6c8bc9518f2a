"""What the server and its clients agree on over the wire, beyond JSON-RPC itself: the
application error codes, and the names of the contracts a connection may ask for by WebSocket
subprotocol. The contracts themselves (method tables, result shapes, error mapping, OpenRPC
documents) are the server's, one object each (:mod:`circles.server.session.contracts`, whose
registry a test holds to these names).
"""

# The application's error codes (openrpc.json's errors; the design's -32001..-32006, -32007, -32008).
AUTH_REQUIRED = -32001
AUTH_FAILED = -32002
SCRIPT_TIMEOUT = -32003
BACKEND_UNAVAILABLE = -32004
SCRIPT_FAILED = -32005
TOO_MANY_REQUESTS = -32006
REPLY_TOO_LARGE = -32007
NO_WORKER = -32008
NOT_A_MEMBER = -32009  # the circle admits its members only (circles.backend.members), and the caller is not one
# The jobs methods of the hero contract (circles.server.session.jobs).
JOB_NOT_FOUND = -32010  # no such job of the caller's in this circle (never created, another key's, deleted, expired)
JOB_STATE = -32011  # the job's status does not allow what was asked (start a started job, the output of a running one)
# The circles-era contract's code for a script that failed (ours: SCRIPT_FAILED).
EXECUTION_ERROR = -32000

# The contracts, by the name --api takes.
GATEWAY = "gateway"  # ours: {output}, {authenticated, pubkey}, -32005 for a failed script
CIRCLES = "circles"  # the original circles server's: a string from play, {authenticated}, -32000
HERO = "hero"  # its later generation's (hero): a string from fetch_nonce, true from authenticate
APIS = (GATEWAY, CIRCLES, HERO)
DEFAULT_API = GATEWAY
# The WebSocket subprotocol that asks for each contract, whatever the server's default.
SUBPROTOCOLS = {GATEWAY: "circles-gateway.v1", CIRCLES: "circles-era.v1", HERO: "circles-hero.v1"}
