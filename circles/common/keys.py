"""secp256k1 public keys as the wire carries them: hex strings naming circles and callers.

Every key that enters the server passes through :func:`normalize_pubkey`, so the rest of the
code only ever sees one form: 33-byte compressed, lower-case hex, no ``0x``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import coincurve

COMPRESSED_HEX_LEN = 66
UNCOMPRESSED_HEX_LEN = 130
#: The lengths a circle's key may have in a path: compressed, or uncompressed as the Rust circles
#: server's clients often write it (both name the same circle once normalized).
PATH_KEY_LENGTHS = frozenset((COMPRESSED_HEX_LEN, UNCOMPRESSED_HEX_LEN))
_HEX_DIGITS = re.compile(r"(?:[0-9a-fA-F]{2})*")


class InvalidKey(ValueError):
    """The text is not a secp256k1 public key we accept; the message says why."""


def parse_hex(text: str) -> bytes:
    """Decode hex with an optional ``0x`` prefix, raising ValueError with a short reason."""
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    # bytes.fromhex skips whitespace anywhere; hex on the wire is digits only.
    if not _HEX_DIGITS.fullmatch(text):
        raise ValueError("not hex")
    return bytes.fromhex(text)


def normalize_pubkey(text: str) -> str:
    """Return the compressed hex form of a 33- or 65-byte public key given as hex."""
    if not isinstance(text, str):
        raise InvalidKey("public key must be a hex string")
    return _normalize(text)


# The same keys come back on every connect and authenticate. Bounded in entries and in size:
# only valid keys are cached (a raise is not), and a valid key is at most 132 characters.
@lru_cache(maxsize=4096)
def _normalize(text: str) -> str:
    try:
        raw = parse_hex(text)
    except ValueError:
        raise InvalidKey("public key is not hex") from None
    if len(raw) not in (33, 65):
        raise InvalidKey("public key must be 33 bytes (compressed) or 65 bytes (uncompressed)")
    # libsecp256k1 also parses the "hybrid" forms 06/07 (SEC 1's uncompressed key with the y
    # parity in the prefix); no wallet makes them and they would name one circle three ways.
    if raw[0] not in ((2, 3) if len(raw) == 33 else (4,)):
        raise InvalidKey("public key must start with 02 or 03 (compressed) or 04 (uncompressed)")
    try:
        key = coincurve.PublicKey(raw)
    except ValueError:
        raise InvalidKey("public key is not a point on secp256k1") from None
    return key.format(compressed=True).hex()


def circle_set(values: Iterable[str]) -> frozenset:
    """Circle ids (public keys in any form :func:`normalize_pubkey` takes) as a set of
    compressed hex; ValueError naming the first that is not a key."""
    circles = set()
    for value in values:
        try:
            circles.add(normalize_pubkey(value))
        except InvalidKey as e:
            raise ValueError(f"invalid circle {value!r}: {e}") from None
    return frozenset(circles)
