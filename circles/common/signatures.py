"""The two signature forms a client may prove a key with, for the server that checks them and
the client that makes them.

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
"""

from __future__ import annotations

import coincurve
from coincurve import ecdsa

from circles.common.keys import parse_hex

ETH_SIGNATURE_LEN = 65
COMPACT_SIGNATURE_LEN = 64
_ETH_PREFIX = b"\x19Ethereum Signed Message:\n"
#: Half the order of secp256k1: a low-S signature has s <= this (EIP-2).
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


class AuthenticationFailed(Exception):
    """The proof did not hold; the message is a short, safe reason for the client."""


def eth_personal_digest(message: bytes) -> bytes:
    """keccak256 of the EIP-191 ``personal_sign`` envelope around ``message``."""
    # Imported at the first signature, not with this module: pycryptodome's keccak has cffi parse
    # its C declarations as it loads, which the server need not do before its port listens
    # (docs/benchmarks.md, "Start-up").
    from Crypto.Hash import keccak

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


def signature_matches(message: bytes, signature: str, pubkey: str | None) -> str | None:
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
