"""Proof of key ownership: nonces and the two signature forms a client may sign them with.

A client proves it holds the private key of ``pubkey`` by signing a nonce the server issued.
The signed message is the nonce string exactly as returned, UTF-8 encoded. Two forms are
accepted, told apart by the signature's length:

* 65 bytes ``r||s||v``: Ethereum ``personal_sign`` (EIP-191). The digest is
  keccak256("\\x19Ethereum Signed Message:\\n" + len(msg) + msg); the key is recovered from the
  signature and must equal ``pubkey``. ``v`` may be 0/1 or 27/28. This is what MetaMask, ethers
  and eth-account produce. ``s`` must be in the lower half of the curve order, Ethereum's rule
  since Homestead (EIP-2): otherwise ``(r, n-s, v^1)`` would be a second valid signature of the
  same message by the same key, which every Ethereum signer avoids.
* 64 bytes compact ``r||s``, or DER: ECDSA over SHA-256(msg), verified against ``pubkey``.
  High-S signatures are normalised first: they are as valid as their low-S twin, and signers
  such as WebCrypto and python-ecdsa do not normalise.

Where nonces live
-----------------

One interface, :class:`INonceStore`, and two stores; issuing and redeeming return Deferreds in
both, so a caller has one path whichever it holds:

* :class:`NonceStore`, here: in this process's memory, expiring by the injected clock, capped in
  all and per owner. Nonces issued over HTTP live here only on a server without Redis.
* :class:`~circles.server.access.redis_nonces.RedisNonceStore`: in Redis, where every process of a
  ``--processes`` server and every server behind a load balancer sees them, so a nonce from
  ``GET /auth/nonce`` authenticates a WebSocket wherever it lands. Single use by an atomic take
  (``GETDEL``), expiring by Redis's clock.

A nonce from ``fetch_nonce`` stays in its session's own :class:`NonceStore`: it is bound to the
session that asked for it (a connection, which lives in one process), so no other process
could redeem it anyway, and ``fetch_nonce`` is a hot path that a Redis round trip would slow
for nothing. It is still the same kind of nonce: the same 128-bit format, TTL and single use,
checked by the same code (:func:`proved_by`), and the session's store implements the same
interface (its synchronous :meth:`NonceStore.issue_now` and :meth:`NonceStore.redeem` are what
the hot path calls).
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from typing import Optional

import attrs
import coincurve
from coincurve import ecdsa
from Crypto.Hash import keccak
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from circles.common.keys import parse_hex

NONCE_BYTES = 16  # 128 bits, the design's floor
ETH_SIGNATURE_LEN = 65
COMPACT_SIGNATURE_LEN = 64
_ETH_PREFIX = b"\x19Ethereum Signed Message:\n"
#: Half the order of secp256k1: a low-S signature has s <= this (EIP-2).
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


class AuthenticationFailed(Exception):
    """The proof did not hold; the message is a short, safe reason for the client."""


class TooManyNonces(Exception):
    """The store is full of live nonces; the caller should back off."""


class TooManyNoncesForOwner(TooManyNonces):
    """This owner (a client address) holds its share of live nonces; it should back off."""


def eth_personal_digest(message: bytes) -> bytes:
    """keccak256 of the EIP-191 ``personal_sign`` envelope around ``message``."""
    digest = keccak.new(digest_bits=256)
    digest.update(_ETH_PREFIX + str(len(message)).encode("ascii") + message)
    return digest.digest()


def _decode_signature(signature: str) -> bytes:
    if not isinstance(signature, str):
        raise AuthenticationFailed("signature must be a hex string")
    try:
        return parse_hex(signature)
    except ValueError:
        raise AuthenticationFailed("signature is not hex") from None


def recover_eth_signer(message: bytes, raw: bytes) -> str:
    """Return the compressed hex key that made the ``personal_sign`` signature ``raw``."""
    v = raw[64]
    if v in (27, 28):
        v -= 27
    if v not in (0, 1):
        raise AuthenticationFailed("signature recovery id must be 0, 1, 27 or 28")
    if int.from_bytes(raw[32:64], "big") > _HALF_ORDER:
        raise AuthenticationFailed("signature s is not low (EIP-2): Ethereum signers never make these")
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            raw[:64] + bytes([v]), eth_personal_digest(message), hasher=None
        )
    except ValueError:
        raise AuthenticationFailed("signature does not recover to a public key") from None
    return key.format(compressed=True).hex()


def verify_ecdsa(message: bytes, raw: bytes, pubkey: str) -> bool:
    """Check a compact (64-byte) or DER ECDSA signature over SHA-256(message) by ``pubkey``."""
    try:
        if len(raw) == COMPACT_SIGNATURE_LEN:
            parsed = ecdsa.deserialize_compact(raw)
        else:
            parsed = ecdsa.der_to_cdata(raw)
    except ValueError:
        raise AuthenticationFailed("signature is neither 64-byte compact, 65-byte r||s||v nor DER") from None
    _, low_s = ecdsa.signature_normalize(parsed)
    key = coincurve.PublicKey(bytes.fromhex(pubkey))
    return key.verify(ecdsa.cdata_to_der(low_s), message)


def signature_matches(message: bytes, signature: str, pubkey: Optional[str]) -> Optional[str]:
    """Return the key that signed ``message`` if the signature is valid for it, else None.

    ``pubkey`` is the compressed hex key the client claims. It may be None only for the
    Ethereum form, where the key is recovered from the signature itself.
    Malformed signatures raise :class:`AuthenticationFailed` with the reason.
    """
    raw = _decode_signature(signature)
    if len(raw) == ETH_SIGNATURE_LEN:
        signer = recover_eth_signer(message, raw)
        return signer if pubkey is None or signer == pubkey else None
    if pubkey is None:
        raise AuthenticationFailed("an ECDSA signature needs the public key it is checked against")
    return pubkey if verify_ecdsa(message, raw, pubkey) else None


def is_nonce_value(value: str) -> bool:
    """Whether ``value`` has the form of a nonce this server issues (lowercase hex of
    :data:`NONCE_BYTES`): anything else is unknown without a look-up."""
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in value)


def proved_by(value: str, bound: Optional[str], pubkey: Optional[str], signature: str) -> str:
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

    def issue(pubkey: Optional[str] = None, owner: Optional[str] = None) -> Deferred:
        """Fire with a new live :class:`Nonce` for ``pubkey`` (None: for whichever key signs it),
        counted against ``owner``'s share if given; fail with :class:`TooManyNonces` when the
        store or the share is full, or :class:`~circles.backend.scripts.BackendUnavailable` when
        the store cannot be reached (its ``BackendFull`` when Redis is at its maxmemory)."""

    def redeem_value(value: str, pubkey: str, signature: str) -> Deferred:
        """Take the nonce ``value`` (used up whatever the outcome: a captured proof cannot be
        replayed) and fire with the key ``signature`` proves, or fail with
        :class:`AuthenticationFailed` (unknown, used or expired nonce, wrong key or signature),
        or ``BackendUnavailable`` as :meth:`issue` does."""

    def live() -> int:
        """The live nonces this process issued (each process counts its own)."""


@attrs.frozen
class Nonce:
    value: str
    pubkey: Optional[str]  # compressed hex, or None when issued without one
    expires_at: int  # whole Unix seconds, as clients are told; refused from then on
    owner: Optional[str] = None  # who asked (a client address), when the store counts owners


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

    def __init__(self, clock: IReactorTime, ttl: float, cap: int, per_owner: int = 0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._cap = cap
        self._per_owner = per_owner
        self._live: OrderedDict[str, Nonce] = OrderedDict()
        self._owned: "dict[str, int]" = {}  # live nonces by owner

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

    def issue(self, pubkey: Optional[str] = None, owner: Optional[str] = None) -> Deferred:
        """:meth:`issue_now`, as a Deferred (:class:`INonceStore`)."""
        try:
            return succeed(self.issue_now(pubkey, owner))
        except TooManyNonces:
            return fail()

    def issue_now(self, pubkey: Optional[str] = None, owner: Optional[str] = None) -> Nonce:
        """A new live nonce for ``pubkey`` (None: for whichever key signs it), counted against
        ``owner``'s share if given; :class:`TooManyNonces` when the store or the share is full."""
        self.sweep()
        if owner is not None and self._per_owner and self._owned.get(owner, 0) >= self._per_owner:
            raise TooManyNoncesForOwner("too many outstanding nonces from this client")
        if len(self._live) >= self._cap:
            raise TooManyNonces("too many outstanding nonces")
        expires_at = math.ceil(self._clock.seconds() + self._ttl)
        nonce = Nonce(secrets.token_hex(NONCE_BYTES), pubkey, expires_at, owner)
        self._live[nonce.value] = nonce
        if owner is not None:
            self._owned[owner] = self._owned.get(owner, 0) + 1
        return nonce

    def take(self, value: str) -> Optional[Nonce]:
        """Remove and return the live nonce ``value``; None if unknown, used or expired."""
        nonce = self._live.pop(value, None)
        if nonce is None:
            return None
        self._forget(nonce)
        if nonce.expires_at <= self._clock.seconds():
            return None
        return nonce

    def redeem(self, pubkey: Optional[str], signature: str, value: Optional[str] = None) -> str:
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

    def _newest_for(self, pubkey: Optional[str]) -> Optional[Nonce]:
        unbound = None
        for nonce in reversed(self._live.values()):
            if nonce.pubkey is None:
                if pubkey is None:
                    return nonce
                unbound = unbound or nonce
            elif nonce.pubkey == pubkey:
                return nonce
        return unbound

    def redeem_value(self, value: str, pubkey: str, signature: str) -> Deferred:
        """Consume the nonce ``value`` (as given by the client) and verify its signature
        (:class:`INonceStore`), already fired.

        Used where the client names the nonce itself (URL authentication). The nonce is used
        up whatever the outcome, so a captured URL cannot be replayed.
        """
        nonce = self.take(value)
        if nonce is None:
            return fail(AuthenticationFailed("nonce unknown, used or expired"))
        try:
            return succeed(proved_by(nonce.value, nonce.pubkey, pubkey, signature))
        except AuthenticationFailed:
            return fail()
