"""A client's side of authentication: private keys, key files, and signing a nonce.

The server's checks live in :mod:`circles.server.access.nonces`; this module produces exactly what they accept,
through the same helpers (:func:`circles.common.signatures.eth_personal_digest`), so the two cannot drift.

Key files hold the 32-byte secret as hex on one line. They are created with mode 0600 and,
like ssh's, refused when other users could read them: a key readable by others is not private.
Keys never come from argv (every user of the machine can read it); the environment variable
:data:`KEY_ENV` is the other source.
"""

from __future__ import annotations

import os
import stat

import coincurve
from coincurve import ecdsa

from circles.common.keys import parse_hex

KEY_ENV = "CIRCLES_PRIVATE_KEY"
SCHEMES = ("eth", "ecdsa")

PrivateKeyLike = coincurve.PrivateKey | bytes | str


class KeyFileError(ValueError):
    """A private key or key file cannot be used; the message says why."""


def private_key(value: PrivateKeyLike) -> coincurve.PrivateKey:
    """A coincurve key from a key object, 32 raw bytes, or 64 hex digits (``0x`` optional)."""
    if isinstance(value, coincurve.PrivateKey):
        return value
    if isinstance(value, str):
        try:
            value = parse_hex(value.strip())
        except ValueError:
            raise KeyFileError("private key is not hex") from None
    if not isinstance(value, bytes) or len(value) != 32:
        raise KeyFileError("private key must be 32 bytes (64 hex digits)")
    try:
        return coincurve.PrivateKey(value)
    except ValueError:
        raise KeyFileError("private key is out of range for secp256k1") from None


def public_key(key: PrivateKeyLike) -> str:
    """The compressed hex public key: the form circle ids and ``pubkey`` params take."""
    return private_key(key).public_key.format(compressed=True).hex()


def sign_nonce(key: PrivateKeyLike, nonce: str, scheme: str = "eth") -> str:
    """Sign the nonce string (its UTF-8 bytes) as ``authenticate`` expects; hex with ``0x``.

    ``eth``: Ethereum ``personal_sign`` (EIP-191), 65 bytes ``r||s||v`` with v 27/28, as
    wallets produce. ``ecdsa``: ECDSA over SHA-256, 64-byte compact ``r||s`` (low S).
    """
    from circles.common.signatures import eth_personal_digest  # keccak (pycryptodome): not for keygen

    key = private_key(key)
    message = nonce.encode("utf-8")
    if scheme == "eth":
        raw = key.sign_recoverable(eth_personal_digest(message), hasher=None)
        return "0x" + (raw[:64] + bytes([raw[64] + 27])).hex()
    if scheme == "ecdsa":
        der = key.sign(message)  # SHA-256, low S (libsecp256k1 always normalises)
        return "0x" + ecdsa.serialize_compact(ecdsa.der_to_cdata(der)).hex()
    raise ValueError(f"unknown signature scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def generate() -> coincurve.PrivateKey:
    """A new random key (coincurve draws it from the OS's CSPRNG)."""
    return coincurve.PrivateKey()


def write_key_file(path: str, key: PrivateKeyLike, *, overwrite: bool = False) -> None:
    """Write the secret as hex, mode 0600 from the start (never briefly readable by others).

    An existing file is refused unless ``overwrite``: losing a key cannot be undone.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; not overwriting a key") from None
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is only used for a new file
        f.write(private_key(key).secret.hex() + "\n")


def read_key_file(path: str) -> coincurve.PrivateKey:
    """Read a key file, refusing one that other users may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:
            raise KeyFileError(f"key file {path} is accessible by others (mode {mode & 0o777:o}); "
                               f"run: chmod 600 {path}")
        text = f.read()
    try:
        return private_key(text)
    except KeyFileError as e:
        raise KeyFileError(f"key file {path}: {e}") from None


def load_key(path: str | None = None, environ: dict | None = None) -> coincurve.PrivateKey | None:
    """The key from ``path`` if given, else from ``$CIRCLES_PRIVATE_KEY``, else None."""
    if path is not None:
        return read_key_file(path)
    value = (os.environ if environ is None else environ).get(KEY_ENV)
    if not value:
        return None
    try:
        return private_key(value)
    except KeyFileError as e:
        raise KeyFileError(f"${KEY_ENV}: {e}") from None
