"""The JSON-RPC methods of a circle session, the state each session keeps, and the session layer
that opens sessions (:class:`Sessions`).

The methods are written once, for every contract: the session's contract
(:mod:`circles.server.session.contracts`) says how their results look and which codes and
messages their errors carry. Each contract's OpenRPC document describes them; tests hold the two in step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from circles.backend.members import MEMBERS, Verdict
from circles.backend.scripts import (
    SOURCE_WS,
    BackendFull,
    BackendUnavailable,
    IAdmittingScriptRunner,
    NotAMember,
    NoWorker,
    ScriptFailed,
    ScriptRequest,
    ScriptTimeout,
)
from circles.common.jsonrpc import (
    INVALID_PARAMS,
    Dispatcher,
    Methods,
    Param,
    ReplyRoom,
    RPCError,
    bind_params,
    is_deferred,
)
from circles.common.keys import InvalidKey, normalize_pubkey
from circles.common.log_budget import ConnectionAnomalies
from circles.common.logs import Logger
from circles.common.logs import enabled as log_enabled
from circles.common.signatures import AuthenticationFailed
from circles.common.wire import (
    BACKEND_UNAVAILABLE,
    NO_WORKER,
    NOT_A_MEMBER,
    REPLY_TOO_LARGE,
    SCRIPT_TIMEOUT,
    TOO_MANY_REQUESTS,
)
from circles.server.access.limits import TokenBucket
from circles.server.access.nonces import NonceStore, TooManyNonces, is_nonce_value
from circles.server.gateway import Gateway

if TYPE_CHECKING:  # the contracts' method tables are this module's: it imports none of them
    from circles.server.session.contracts.base import Contract, Registry

log = Logger()
methods = Methods()


class Sessions:
    """The session layer of one server, built once by the composition root on its gateway: the
    contracts it speaks, each with one JSON-RPC dispatcher (over the contract's method table,
    with the server's limits and metrics) that all its sessions share; the contract of a
    connection that asks for none (the server's ``--api``); the sessions it opens.

    A request flows down from here: the transport (circles.protocol) hands it to its session,
    which answers with its contract's dispatcher and methods, which ask the script backend."""

    def __init__(self, gateway: Gateway, contracts: Registry) -> None:
        config = gateway.config
        self.gateway = gateway
        self.contracts = contracts
        #: What a connection that offers no subprotocol of ours gets: the server's ``--api``.
        self.default: Contract = contracts[config.api]
        gateway.metrics.label_methods(contracts.method_names())
        too_many = RPCError(TOO_MANY_REQUESTS, f"Too many requests: a batch holds at most {config.max_batch}")
        self._dispatchers = {
            contract: Dispatcher(contract.methods, config.max_batch, too_many, observe=gateway.metrics.request,
                                 max_reply=config.max_message_size, too_large=self._reply_too_large)
            for contract in contracts
        }

    def _reply_too_large(self, size: int) -> RPCError:
        return RPCError(REPLY_TOO_LARGE, "Reply too large: it exceeds the connection's message size limit",
                        {"size": size, "limit": self.gateway.config.max_message_size})

    def negotiate(self, offered: Sequence[str]) -> tuple[Contract, str | None]:
        """(the contract a connection gets, the subprotocol to answer with) for the WebSocket
        subprotocols its client offered (:meth:`~circles.server.session.contracts.base.Registry.negotiate`)."""
        return self.contracts.negotiate(offered, self.default)

    def open(self, circle: str, pubkey: str | None = None, connection_id: int | None = None,
             peer: str | None = None, contract: Contract | None = None) -> Session:
        """A session on ``circle`` under ``contract`` (one of this server's; None: its default),
        authenticated as ``pubkey`` if given (a URL proof)."""
        contract = self.default if contract is None else contract
        circle = sys.intern(circle)  # one string a circle, not one a connection
        return Session(self.gateway, contract, self._dispatchers[contract], circle, pubkey, connection_id, peer)


#: A session's plays while none waits (the set is made at the first, and let go with the last).
_NO_PLAYS: frozenset = frozenset()


class Session:
    """One client's view of a circle: who it has proved to be and the nonces it holds.

    Opened by :meth:`Sessions.open`, with its contract and that contract's dispatcher. One per
    connection, idle ones included: its state is in slots, and what only some sessions use (a
    set of plays, nonces) is made when first used."""

    __slots__ = ("gateway", "contract", "_rpc", "connection_id", "circle", "pubkey", "nonces", "requests",
                 "in_flight", "plays", "proving", "closed", "anomalies", "reply_room")

    def __init__(self, gateway: Gateway, contract: Contract, rpc: Dispatcher, circle: str,
                 pubkey: str | None = None, connection_id: int | None = None, peer: str | None = None) -> None:
        self.gateway = gateway
        #: The contract this connection gets (circles.server.session.contracts), chosen once as it opened.
        self.contract = contract
        self._rpc = rpc  # the contract's JSON-RPC dispatcher
        self.connection_id = connection_id  # names the session in logs
        self.circle = circle
        self.pubkey = pubkey  # compressed hex once authenticated
        config = gateway.config
        self.nonces = NonceStore(gateway.clock, config.nonce_ttl, config.max_nonces_per_session)
        self.requests = TokenBucket(gateway.clock, config.rate_limit, config.rate_burst)
        self.in_flight = 0  # messages received and not yet answered
        # The script backend's Deferreds of this session's plays still waiting (hold, release).
        self.plays: AbstractSet[Deferred] = _NO_PLAYS
        #: An ``authenticate`` waiting for the shared nonce store (Redis), while one does: its
        #: Deferred, which the connection waits for before it takes another request.
        self.proving: Deferred | None = None
        self.closed = False  # its connection is gone (close): what is still called starts no play
        self.anomalies = ConnectionAnomalies(connection_id, peer, gateway.anomaly_log)  # logged within bounds
        # What a reply that comes later (a play's) may take when it is ready: the connection's
        # circles.server.session.backlog.Backlog, which holds it to what the client has left unread. None: no bound.
        self.reply_room: ReplyRoom | None = None

    @property
    def authenticated(self) -> bool:
        return self.pubkey is not None

    def answer(self, payload) -> str | None | Deferred:
        """Answer one WebSocket message: the reply text (or None) at once, or a Deferred of it
        while a method (play) works; ``in_flight`` counts those, so shutdown knows whom to wait
        for. Raises (or the Deferred fails with) :class:`~circles.common.jsonrpc.ReplyTooLarge` when
        no reply fits."""
        reply = self._rpc.answer(payload, self, self._admit, self.reply_room)
        if is_deferred(reply):
            self.in_flight += 1
            reply.addBoth(self._answered)
        return reply

    def _answered(self, result):
        self.in_flight -= 1
        return result

    def hold(self, d: Deferred) -> None:
        """Count ``d``, a play's Deferred, among the :attr:`plays` waiting (until :meth:`release`)."""
        plays = self.plays
        if plays is _NO_PLAYS:
            plays = self.plays = set()
        plays.add(d)  # type: ignore[attr-defined]  # a set once made

    def release(self, d: Deferred) -> None:
        """``d`` no longer waits."""
        plays = self.plays
        if d in plays:
            plays.discard(d)  # type: ignore[attr-defined]  # a set once made
            if not plays:
                self.plays = _NO_PLAYS

    def close(self) -> None:
        """The connection is gone: stop waiting for its plays (their tasks are expired, so no
        worker runs a script nobody waits for) and answer nothing more."""
        self.closed = True
        plays, self.plays = self.plays, _NO_PLAYS
        for d in plays:
            d.cancel()
        if self.proving is not None:  # the store's answer is its own to come; nobody waits for it
            self.proving.cancel()

    def _admit(self, requests: int) -> RPCError | None:
        if self.requests.take(requests):
            return None
        return RPCError(TOO_MANY_REQUESTS, "Too many requests: slow down", {"rate_limit": self.gateway.config.rate_limit})


def _pubkey_param(value: str) -> str:
    try:
        return normalize_pubkey(value)
    except InvalidKey as e:
        raise RPCError(INVALID_PARAMS, f"Invalid params: {e}") from None


@methods.add("fetch_nonce", Param("pubkey", (str,), required=False))
def fetch_nonce(session: Session, pubkey: str | None = None) -> Any:  # as its contract shapes it
    key = None if pubkey is None else _pubkey_param(pubkey)
    try:
        nonce = session.nonces.issue_now(key)  # in memory, synchronous: a hot path
    except TooManyNonces:
        raise RPCError(TOO_MANY_REQUESTS, "Too many requests: too many outstanding nonces on this connection") from None
    return session.contract.nonce_result(nonce)


def _credentials(params) -> tuple:
    """(pubkey, signature, nonce) from every form clients send.

    Ours is ``{pubkey, signature}``; the ecosystem's earlier clients send
    ``{credentials: {pubkey, signature}}``, ``[pubkey, signature]`` or ``[{pubkey, signature}]``.
    """
    if isinstance(params, list) and len(params) == 1 and isinstance(params[0], dict):
        params = params[0]
    elif isinstance(params, dict) and params.keys() == {"credentials"} and isinstance(params["credentials"], dict):
        params = params["credentials"]
    bound = bind_params(params, _CREDENTIALS)
    return bound.get("pubkey"), bound["signature"], bound.get("nonce")


# pubkey may be left out with a personal_sign signature, which names its key itself: browser
# wallets expose addresses, not public keys, so the playground cannot send one. nonce names the
# nonce signed; without it, the newest one issued to this connection for that key (else for none).
_CREDENTIALS = (Param("pubkey", (str,), required=False), Param("signature", (str,)),
                Param("nonce", (str,), required=False))


@methods.add("authenticate", *_CREDENTIALS, raw_params=True, ordered=True)
def authenticate(session: Session, params) -> Any:  # as its contract shapes it
    pubkey, signature, nonce = _credentials(params)
    try:
        key = None if pubkey is None else normalize_pubkey(pubkey)
        if nonce is not None and not session.nonces.holds(nonce):
            return _prove_shared(session, key, signature, nonce)
        signer = session.nonces.redeem(key, signature, nonce)  # in memory, synchronous: a hot path
    except (InvalidKey, AuthenticationFailed) as e:
        raise _auth_failed(session, e) from None
    return _authenticated(session, signer)


def _prove_shared(session: Session, key: str | None, signature: str, nonce: str) -> Any:
    """``authenticate`` with a nonce that is not one of the session's: one of the shared store
    (``GET /auth/nonce``'s: Redis, or this process's memory without it), taken there once
    whatever the outcome. A value not of the server's nonce form is refused without asking.

    With Redis the answer comes later: the session's ``proving`` is the Deferred meanwhile, and
    its connection takes no other request until it fires (circles.protocol); in a batch, the
    calls after it wait for it too (the method is ``ordered``)."""
    if not is_nonce_value(nonce):
        raise AuthenticationFailed("nonce unknown, used or expired")
    d = Deferred.fromCoroutine(_redeem_shared(session, key, signature, nonce))
    if not d.called:
        session.proving = d
    return d


async def _redeem_shared(session: Session, key: str | None, signature: str, nonce: str) -> Any:
    try:
        try:
            signer = await session.gateway.http_nonces.redeem_value(nonce, key, signature)
        except AuthenticationFailed as e:
            raise _auth_failed(session, e) from None
        except BackendUnavailable as e:
            # Not a verdict on the proof: the store could not be asked (nor can it say whether
            # the nonce was taken). The design's code for Redis down: -32004, as a play gets.
            raise RPCError(BACKEND_UNAVAILABLE, "Nonce store unavailable, retry later", str(e)) from None
        return _authenticated(session, signer)
    finally:
        session.proving = None


def _auth_failed(session: Session, e: Exception) -> RPCError:
    session.anomalies.note("authentication failed", "connection {conn}: authentication failed on circle "
                           "{circle}: {reason}", circle=session.circle, reason=str(e))
    session.gateway.metrics.auth_failures.inc()
    return session.contract.auth_failed(str(e))


def _authenticated(session: Session, signer: str) -> Any:
    session.gateway.metrics.auth_successes.inc()
    session.pubkey = signer
    # One info line per connection (when it closes, with who it was) is enough at full load.
    log.debug("connection {conn} authenticated as {pubkey} on circle {circle}",
              conn=session.connection_id, pubkey=signer, circle=session.circle)
    _note_membership(session, signer)
    return session.contract.authenticated(signer)


@methods.add("whoami")
def whoami(session: Session) -> dict:
    return {"circle": session.circle, "authenticated": session.authenticated, "pubkey": session.pubkey}


def check_script(gateway: Gateway, script: str, name: str = "script") -> None:
    """Refuse a script the workers would not take: one that is not valid Unicode (-32602), one over
    ``--max-script-size`` (-32006). What the worker would refuse is never written to Redis."""
    try:
        size = len(script.encode("utf-8"))
    except UnicodeEncodeError:  # JSON allows lone surrogates; Redis and workers take UTF-8 only
        raise RPCError(INVALID_PARAMS, f"Invalid params: '{name}' is not valid Unicode (lone surrogate)") from None
    most = gateway.config.max_script_size
    if size > most:
        raise RPCError(TOO_MANY_REQUESTS, f"Too many requests: the script is {size} bytes, over the server's "
                       f"limit of {most} (--max-script-size)", {"size": size, "limit": most})


def capped_timeout(gateway: Gateway, timeout: float | None, name: str = "timeout") -> float:
    """The seconds a script may take: ``timeout`` (a positive number, else -32602) if given, never
    more than ``--script-timeout``."""
    limit = gateway.config.script_timeout
    if timeout is not None:
        if not timeout > 0:
            raise RPCError(INVALID_PARAMS, f"Invalid params: '{name}' must be a positive number of seconds")
        limit = min(timeout, limit)
    return limit


@methods.add("play", Param("script", (str,)), Param("timeout", (int, float), required=False))
def play(session: Session, script: str, timeout: float | None = None) -> Deferred:
    if session.closed:  # the rest of a batch that waited for an authenticate: nobody is left to answer
        raise CancelledError()
    gateway = session.gateway
    if gateway.config.auth_required and not session.authenticated:
        raise session.contract.auth_required()
    check_script(gateway, script)
    limit = capped_timeout(gateway, timeout)
    if gateway.draining:
        raise RPCError(BACKEND_UNAVAILABLE, "Script backend unavailable", "the server is shutting down")
    most = gateway.config.max_plays
    if most and len(session.plays) >= most:
        raise RPCError(TOO_MANY_REQUESTS, f"Too many requests: {most} plays already wait on this connection",
                       {"max_plays": most})
    request = ScriptRequest(session.circle, script, session.pubkey or "", SOURCE_WS, limit)
    started = gateway.clock.seconds()
    runner = gateway.scripts
    if gateway.members is None or not runner.is_connected():
        # No Redis keeps policies (anyone plays), or none takes tasks now: run() says why at once.
        d = runner.run(request)
    elif IAdmittingScriptRunner.providedBy(runner):
        # Asked at each play, in the step that queues it: a member removed, or a circle closed,
        # is refused from the next one (NotAMember, answered by _played).
        d = runner.run_admitted(request)
    else:
        d = gateway.members.check(session.circle, request.caller)
        d.addCallback(_admitted, session, request)
    session.hold(d)
    # One callback, not a coroutine nor a chain of them: per play (the hot path).
    return d.addBoth(_played, session, d, started, limit, request, session.contract.play_result)


def _played(result, session: Session, d: Deferred, started: float, limit: float, request: ScriptRequest,
            shape: Callable[[str], Any] | None) -> Any:
    """A play's Deferred ``d`` fired: it waits no more, its time is observed (unless cancelled:
    never answered), and its output takes the contract's ``shape`` (None: the output as it is),
    or its failure becomes the RPC error the design names."""
    session.release(d)
    gateway = session.gateway
    if not isinstance(result, Failure):
        gateway.metrics.play_seconds.observe(gateway.clock.seconds() - started)
        return result if shape is None else shape(result)
    if result.check(CancelledError):
        return result
    gateway.metrics.play_seconds.observe(gateway.clock.seconds() - started)
    if result.check(NotAMember):
        return _not_admitted(result, session, request)
    return _script_error(result, session, limit)


def _admitted(verdict, session: Session, request: ScriptRequest) -> Deferred:
    """Run ``request`` if the circle's policy lets its caller play, else -32009."""
    if verdict.allowed:
        return session.gateway.scripts.run(request)
    raise _refusal(session, request, verdict)


def _not_admitted(failure: Failure, session: Session, request: ScriptRequest) -> Failure:
    """A play the runner's queuing step refused for the circle's policy: -32009."""
    failure.trap(NotAMember)
    refused, members = failure.value, session.gateway.members
    assert isinstance(refused, NotAMember) and members is not None  # only asked with a policy to read
    raise _refusal(session, request, members.noted(Verdict(False, refused.policy), session.circle))


def _refusal(session: Session, request: ScriptRequest, verdict) -> RPCError:
    """-32009 for a caller the circle's policy refuses, noted within the session's bounds."""
    session.anomalies.note("not a member", "connection {conn}: a play on circle {circle} refused: {who} is not a "
                           "member (policy {policy})", circle=session.circle,
                           who=request.caller or "an anonymous caller", policy=verdict.policy[:100])
    if verdict.policy != MEMBERS:
        why = "this circle's policy is neither open nor members: every play is refused"
    elif request.caller:
        why = "this circle admits its members only, and the authenticated key is not one"
    else:
        why = "this circle admits its members only: authenticate with a member's key"
    return RPCError(NOT_A_MEMBER, "Not a member of this circle", why)


def _note_membership(session: Session, key: str) -> None:
    """Authentication proves who the caller is; whether that key may play is the circle's policy,
    checked at each play. Read now too, so that the log says at once (debug) when a key that
    authenticated may not play here. The answer is not delayed, nor changed, by it."""
    members = session.gateway.members
    if members is None or not log_enabled(LogLevel.debug):
        return

    def noted(verdict) -> None:
        log.debug("connection {conn}: {pubkey} {may} play on circle {circle} (policy {policy})",
                  conn=session.connection_id, pubkey=key, circle=session.circle, policy=verdict.policy[:100],
                  may="may" if verdict.allowed else "may not")

    members.check(session.circle, key).addCallbacks(noted, lambda failure: None)


def _script_error(failure, session: Session, timeout: float) -> Any:
    if failure.check(ScriptTimeout):
        # A client can time out as many plays as its rate allows (a tiny timeout, a circle
        # without workers): logged within the session's and the gateway's bounds.
        if failure.value.by_worker:
            session.anomalies.note("script timed out", "connection {conn}: a play on circle {circle} timed out "
                                   "(stopped by the worker at its --script-timeout)", circle=session.circle)
        else:
            session.anomalies.note("script timed out", "connection {conn}: a play on circle {circle} timed out "
                                   "after {timeout}s", circle=session.circle, timeout=timeout)
        raise RPCError(SCRIPT_TIMEOUT, "Script timed out")
    if failure.check(NoWorker):  # answered at once, nothing queued: no live worker serves the circle
        raise RPCError(NO_WORKER, "No worker is serving this circle")
    if failure.check(BackendFull):
        raise RPCError(BACKEND_UNAVAILABLE, "Script backend unavailable: Redis is full (maxmemory)", str(failure.value))
    if failure.check(BackendUnavailable):
        raise RPCError(BACKEND_UNAVAILABLE, "Script backend unavailable", str(failure.value))
    if failure.check(ScriptFailed):
        raise session.contract.script_failed(failure.value)
    return failure


@methods.add("rpc.discover")
def discover(session: Session) -> dict:
    return session.contract.document()
