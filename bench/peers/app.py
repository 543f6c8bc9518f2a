"""The application both peers serve: three JSON-RPC 2.0 methods and their per-connection state.

Written the way one would for production with no framework around it: plain synchronous
functions, one dict per connection, the same semantics as circles for what the benchmark
exercises. Only the transport differs between ``websockets_peer.py`` and ``autobahn_peer.py``.

* ``fetch_nonce {pubkey}`` -> ``{nonce, expires_at}``: 128 bits from ``secrets.token_hex``,
  bound to the connection and to ``pubkey``, single use, expires after ``NONCE_TTL`` seconds;
  at most ``MAX_NONCES`` outstanding per connection.
* ``authenticate {pubkey, signature}`` -> ``{authenticated, pubkey}``: Ethereum
  ``personal_sign`` (65-byte r||s||v): keccak256 of the EIP-191 envelope, key recovered with
  coincurve, must equal ``pubkey``; the matching nonce is consumed.
* ``whoami`` -> ``{circle, authenticated, pubkey}``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from typing import Any

import coincurve
from Crypto.Hash import keccak

NONCE_TTL = 300.0
MAX_NONCES = 16
MAX_MESSAGE_SIZE = 1024 * 1024
MAX_BATCH = 100
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_ETH_PREFIX = b"\x19Ethereum Signed Message:\n"


class RPCError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def _hex(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    if not _HEX.fullmatch(text):
        raise ValueError("not hex")
    return bytes.fromhex(text)


def normalize_pubkey(text: Any) -> str:
    """Compressed hex of a 33- or 65-byte secp256k1 key given as hex; ValueError otherwise."""
    raw = _hex(text)
    if len(raw) not in (33, 65):
        raise ValueError("public key must be 33 or 65 bytes")
    return coincurve.PublicKey(raw).format(compressed=True).hex()


def circle_from_path(path: str) -> str | None:
    """The circle a request path ``/{circle_pk}`` names (compressed hex), or None."""
    name = path.split("?", 1)[0].lstrip("/")
    if len(name) != 66:
        return None
    try:
        return normalize_pubkey(name)
    except ValueError:
        return None


def recover_eth_signer(message: bytes, signature: str) -> str:
    raw = _hex(signature)
    if len(raw) != 65:
        raise ValueError("signature must be 65 bytes r||s||v")
    v = raw[64] - 27 if raw[64] >= 27 else raw[64]
    if v not in (0, 1):
        raise ValueError("bad recovery id")
    digest = keccak.new(digest_bits=256, data=_ETH_PREFIX + str(len(message)).encode() + message).digest()
    key = coincurve.PublicKey.from_signature_and_message(raw[:64] + bytes([v]), digest, hasher=None)
    return key.format(compressed=True).hex()


class Connection:
    """State of one client connection: its circle, who it proved to be, its live nonces."""

    __slots__ = ("circle", "pubkey", "nonces")

    def __init__(self, circle: str) -> None:
        self.circle = circle
        self.pubkey: str | None = None
        self.nonces: dict[str, tuple[str | None, float]] = {}  # value -> (pubkey, expires_at)

    def _sweep(self, now: float) -> None:
        # Insertion order is expiry order (one TTL for all), so expired nonces are at the front.
        nonces = self.nonces
        while nonces:
            oldest = next(iter(nonces))
            if nonces[oldest][1] > now:
                break
            del nonces[oldest]

    def fetch_nonce(self, params: dict) -> dict:
        pubkey = params.get("pubkey")
        try:
            key = None if pubkey is None else normalize_pubkey(pubkey)
        except ValueError as e:
            raise RPCError(-32602, f"Invalid params: {e}") from None
        now = time.time()
        self._sweep(now)
        if len(self.nonces) >= MAX_NONCES:  # module global: the peers' --max-nonces sets it
            raise RPCError(-32006, "Too many requests: too many outstanding nonces")
        value = secrets.token_hex(16)
        expires_at = math.ceil(now + NONCE_TTL)
        self.nonces[value] = (key, expires_at)
        return {"nonce": value, "expires_at": expires_at}

    def authenticate(self, params: dict) -> dict:
        pubkey, signature = params.get("pubkey"), params.get("signature")
        if not isinstance(pubkey, str) or not isinstance(signature, str):
            raise RPCError(-32602, "Invalid params: pubkey and signature must be strings")
        try:
            key = normalize_pubkey(pubkey)
        except ValueError as e:
            raise RPCError(-32002, f"Authentication failed: {e}") from None
        now = time.time()
        self._sweep(now)
        for value, (bound, _) in reversed(self.nonces.items()):
            if bound is not None and bound != key:
                continue
            try:
                signer = recover_eth_signer(value.encode(), signature)
            except ValueError as e:
                raise RPCError(-32002, f"Authentication failed: {e}") from None
            if signer == key:
                del self.nonces[value]
                self.pubkey = key
                return {"authenticated": True, "pubkey": key}
        raise RPCError(-32002, "Authentication failed: no live nonce matches this signature")

    def whoami(self, params: dict) -> dict:
        return {"circle": self.circle, "authenticated": self.pubkey is not None, "pubkey": self.pubkey}

    METHODS = {"fetch_nonce": fetch_nonce, "authenticate": authenticate, "whoami": whoami}

    def _call(self, request: Any) -> dict | None:
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str):
            return {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}
        id_ = request.get("id")
        notification = "id" not in request
        params = request.get("params", {})
        try:
            method = self.METHODS.get(request["method"])
            if method is None:
                raise RPCError(-32601, "Method not found")
            if not isinstance(params, dict):
                raise RPCError(-32602, "Invalid params: expected an object")
            result = method(self, params)
        except RPCError as e:
            return None if notification else {"jsonrpc": "2.0", "error": {"code": e.code, "message": e.message}, "id": id_}
        return None if notification else {"jsonrpc": "2.0", "result": result, "id": id_}

    def handle(self, text: str) -> str | None:
        """One JSON-RPC message (request, notification or batch) in; reply text or None out."""
        try:
            message = json.loads(text)
        except ValueError:
            return json.dumps({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None})
        if isinstance(message, list):
            if not message or len(message) > MAX_BATCH:
                return json.dumps({"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None})
            replies = [r for r in map(self._call, message) if r is not None]
            return json.dumps(replies, separators=(",", ":")) if replies else None
        reply = self._call(message)
        return None if reply is None else json.dumps(reply, separators=(",", ":"))
