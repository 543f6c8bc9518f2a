"""Proof of key ownership: the nonces a client signs (the signature forms it may sign them with
are :mod:`circles.common.signatures`).

Where nonces live
-----------------

One interface, :class:`INonceStore`, and two stores; issuing and redeeming return Deferreds in
both, so a caller has one path whichever it holds:

* :class:`NonceStore`, here: in this process's memory, expiring by the injected clock, capped in
  all and per owner.
* :class:`~circles.server.access.redis_nonces.RedisNonceStore`: in Redis, where every process of a
  ``--processes`` server and every server behind a load balancer sees them. Single use by an
  atomic take (``GETDEL``), expiring by Redis's clock.

Each server has one **shared store**, the gateway's ``http_nonces``: Redis when it has one, else
a :class:`NonceStore` of the whole process. It holds the nonces of ``GET /auth/nonce``, which are
bound to no session: such a nonce is redeemed at the WebSocket upgrade (``?pubkey&sig&nonce``)
or by the ``authenticate`` method of any session, on any process, once.

Each session has a :class:`NonceStore` of its own for the nonces of its ``fetch_nonce``: such a
nonce is bound to the session that asked for it (the design's rule), so it is redeemed by that
session's ``authenticate`` only, and refused anywhere else (another connection's
``authenticate``, or a URL: 401), as a nonce of another key is. The session lives in one
process, so no other process could take it anyway, and ``fetch_nonce`` and ``authenticate``
with it are a hot path that a Redis round trip would slow for nothing: the session's store is
called synchronously (:meth:`NonceStore.issue_now`, :meth:`NonceStore.redeem`).

So a nonce is a nonce wherever it was fetched: one format (128 random bits, hex: anything else
is refused without asking a store, :func:`is_nonce_value`), one TTL (``--nonce-ttl``), single
use, one signature check (:func:`proved_by`); what differs is what it is bound to. An
``authenticate`` naming a nonce that is not one of its session's live ones asks the shared
store (asynchronously with Redis: the connection then takes nothing more until it is answered,
:mod:`circles.protocol`). One difference follows from the two stores: a failed attempt with a
session's nonce consumes nothing (the client may retry with a corrected signature), while a
shared nonce is used up by any attempt (a captured proof cannot be replayed anywhere).
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from circles.common.signatures import AuthenticationFailed, signature_matches

NONCE_BYTES = 16  # 128 bits, the design's floor
class TooManyNonces(Exception):
    """The store is full of live nonces; the caller should back off."""


class TooManyNoncesForOwner(TooManyNonces):
    """This owner (a client address) holds its share of live nonces; it should back off."""


def is_nonce_value(value: str) -> bool:
    """Whether ``value`` has the form of a nonce this server issues (lowercase hex of
    :data:`NONCE_BYTES`): anything else is unknown without a look-up."""
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in value)


def proved_by(value: str, bound: str | None, pubkey: str | None, signature: str) -> str:
    """The key that proved itself with ``signature`` over the nonce ``value``, or
    :class:`AuthenticationFailed`: the one check of a nonce, whatever the store that held it.

    ``bound``: the key the nonce was issued for, None if for any; ``pubkey``: the key the client
    claims, None to take the bound one or, with neither, the key a ``personal_sign`` signature
    recovers to."""
    if bound is not None and pubkey is not None and bound != pubkey:
        raise AuthenticationFailed("nonce was issued for another public key")
    signer = signature_matches(value.encode("utf-8"), signature, pubkey if pubkey is not None else bound)
    if signer is None:
        raise AuthenticationFailed("signature does not match the public key and nonce")
    return signer


class INonceStore(Interface):
    """Where nonces are issued and redeemed; both return Deferreds whatever the store."""

    def issue(pubkey: str | None = None, owner: str | None = None) -> Deferred:
        """Fire with a new live :class:`Nonce` for ``pubkey`` (None: for whichever key signs it),
        counted against ``owner``'s share if given; fail with :class:`TooManyNonces` when the
        store or the share is full, or :class:`~circles.backend.scripts.BackendUnavailable` when
        the store cannot be reached (its ``BackendFull`` when Redis is at its maxmemory)."""

    def redeem_value(value: str, pubkey: str | None, signature: str) -> Deferred:
        """Take the nonce ``value`` (used up whatever the outcome: a captured proof cannot be
        replayed) and fire with the key ``signature`` proves (``pubkey`` as :func:`proved_by`
        takes it), or fail with
        :class:`AuthenticationFailed` (unknown, used or expired nonce, wrong key or signature),
        or ``BackendUnavailable`` as :meth:`issue` does."""

    def live() -> int:
        """The live nonces this process issued (each process counts its own)."""


@attrs.frozen
class Nonce:
    value: str
    pubkey: str | None  # compressed hex, or None when issued without one
    expires_at: int  # whole Unix seconds, as clients are told; refused from then on
    owner: str | None = None  # who asked (a client address), when the store counts owners


#: A store's nonces, and their count by owner, until it issues one: empty, and read-only.
_NONE_LIVE: Mapping[str, Nonce] = MappingProxyType(OrderedDict())
_NONE_OWNED: Mapping[str, int] = MappingProxyType({})


@implementer(INonceStore)
class NonceStore:
    """Live nonces, single use, each with an expiry taken from an injected clock.

    One store serves a session (its own nonces die with it) or a whole process (nonces issued
    over HTTP, before any connection exists, on a server without Redis; with Redis, the
    :class:`~circles.server.access.redis_nonces.RedisNonceStore` keeps one as its count of what this process
    issued). Either way it is capped: when it is full of live nonces, :meth:`issue` refuses
    rather than growing. Insertion order is expiry order (the TTL
    is fixed), so sweeping pops from the front and costs only what it removes.

    A process-wide store is also capped per owner (``per_owner``, 0: no limit): one client
    filling it would otherwise lock every other client out until its nonces expire.
    """

    __slots__ = ("_clock", "_ttl", "_cap", "_per_owner", "_live", "_owned")

    def __init__(self, clock: IReactorTime, ttl: float, cap: int, per_owner: int = 0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._cap = cap
        self._per_owner = per_owner
        # Made at the first nonce (a session's store, one per connection, mostly never issues one).
        self._live: OrderedDict[str, Nonce] = _NONE_LIVE  # type: ignore[assignment]  # read-only until then
        self._owned: dict[str, int] = _NONE_OWNED  # type: ignore[assignment]  # live nonces by owner

    def owned_by(self, owner: str) -> int:
        """Live nonces issued to ``owner``."""
        self.sweep()
        return self._owned.get(owner, 0)

    def _forget(self, nonce: Nonce) -> None:
        if nonce.owner is not None:
            left = self._owned[nonce.owner] - 1
            if left:
                self._owned[nonce.owner] = left
            else:
                del self._owned[nonce.owner]

    def __len__(self) -> int:
        self.sweep()
        return len(self._live)

    def live(self) -> int:
        return len(self)

    def sweep(self) -> None:
        now = self._clock.seconds()
        live = self._live
        while live:
            oldest = next(iter(live.values()))
            if oldest.expires_at > now:
                break
            self._forget(live.popitem(last=False)[1])

    def issue(self, pubkey: str | None = None, owner: str | None = None) -> Deferred:
        """:meth:`issue_now`, as a Deferred (:class:`INonceStore`)."""
        try:
            return succeed(self.issue_now(pubkey, owner))
        except TooManyNonces:
            return fail()

    def issue_now(self, pubkey: str | None = None, owner: str | None = None) -> Nonce:
        """A new live nonce for ``pubkey`` (None: for whichever key signs it), counted against
        ``owner``'s share if given; :class:`TooManyNonces` when the store or the share is full."""
        self.sweep()
        if owner is not None and self._per_owner and self._owned.get(owner, 0) >= self._per_owner:
            raise TooManyNoncesForOwner("too many outstanding nonces from this client")
        if len(self._live) >= self._cap:
            raise TooManyNonces("too many outstanding nonces")
        expires_at = math.ceil(self._clock.seconds() + self._ttl)
        nonce = Nonce(secrets.token_hex(NONCE_BYTES), pubkey, expires_at, owner)
        if self._live is _NONE_LIVE:
            self._live = OrderedDict()
        self._live[nonce.value] = nonce
        if owner is not None:
            if self._owned is _NONE_OWNED:
                self._owned = {}
            self._owned[owner] = self._owned.get(owner, 0) + 1
        return nonce

    def holds(self, value: str) -> bool:
        """Whether ``value`` is one of the live nonces here."""
        self.sweep()
        return value in self._live

    def take(self, value: str) -> Nonce | None:
        """Remove and return the live nonce ``value``; None if unknown, used or expired."""
        live = self._live
        nonce = live.pop(value, None) if live else None
        if nonce is None:
            return None
        self._forget(nonce)
        if nonce.expires_at <= self._clock.seconds():
            return None
        return nonce

    def redeem(self, pubkey: str | None, signature: str, value: str | None = None) -> str:
        """Check ``signature`` over one live nonce, consume it and return the signer's key.

        The nonce is ``value`` when the client names it, else the newest one issued for
        ``pubkey``, else the newest issued for no key. One signature check whatever the number of live nonces:
        trying each of them made a failed attempt cost up to 16 key recoveries, CPU an
        unauthenticated client could spend at will. A failed attempt consumes nothing, so a
        client may retry with a corrected signature until the nonce expires.
        """
        self.sweep()
        if value is not None:
            nonce = self._live.get(value)
            if nonce is None:
                raise AuthenticationFailed("nonce unknown, used or expired")
        else:
            nonce = self._newest_for(pubkey)
            if nonce is None:
                raise AuthenticationFailed("no live nonce for this public key: call fetch_nonce first")
        signer = proved_by(nonce.value, nonce.pubkey, pubkey, signature)
        del self._live[nonce.value]
        self._forget(nonce)
        return signer

    def _newest_for(self, pubkey: str | None) -> Nonce | None:
        unbound = None
        for nonce in reversed(self._live.values()):
            if nonce.pubkey is None:
                if pubkey is None:
                    return nonce
                unbound = unbound or nonce
            elif nonce.pubkey == pubkey:
                return nonce
        return unbound

    def redeem_value(self, value: str, pubkey: str | None, signature: str) -> Deferred:
        """Consume the nonce ``value`` (as given by the client) and verify its signature
        (:class:`INonceStore`), already fired.

        Used where the client names a nonce of the shared store (URL authentication, or
        ``authenticate`` with a nonce from ``GET /auth/nonce``). The nonce is used up whatever
        the outcome, so a captured proof cannot be replayed.
        """
        nonce = self.take(value)
        if nonce is None:
            return fail(AuthenticationFailed("nonce unknown, used or expired"))
        try:
            return succeed(proved_by(nonce.value, nonce.pubkey, pubkey, signature))
        except AuthenticationFailed:
            return fail()
