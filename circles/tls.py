"""TLS for the listening port: PEM files in, a hardened Twisted context factory out.

Twisted's ``CertificateOptions`` already refuses anything below TLS 1.2 and uses a cipher list
without weak suites; we pin the TLS 1.2 floor explicitly so a future default cannot lower it.
Every way the files can be wrong (missing, unreadable, not PEM, key not matching the
certificate) is one :class:`TLSError` with a one-line message for the operator.
"""

from __future__ import annotations

from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion


class TLSError(Exception):
    """The certificate or key cannot be used; ``str()`` is the operator's one-line message."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read TLS {what} {path!r}: {e.strerror}") from None


def _public_der(has_public_key) -> bytes:
    """The DER public key of a private key or a certificate, to compare the two."""
    return has_public_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load(cert_path: str, key_path: Optional[str] = None) -> CertificateOptions:
    """Build server TLS options from a PEM certificate (chain) and a PEM private key.

    ``key_path`` may be None when the key is in the certificate file. Certificates after the
    first in ``cert_path`` are sent as the chain.
    """
    cert_pem = _read(cert_path, "certificate")
    key_pem = cert_pem if key_path is None else _read(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSError(f"no PEM certificate in {cert_path!r}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        where = key_path or cert_path
        raise TLSError(f"no unencrypted PEM private key in {where!r}") from None
    if _public_der(key) != _public_der(chain[0]):
        raise TLSError(f"the private key does not match the certificate in {cert_path!r}")
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
