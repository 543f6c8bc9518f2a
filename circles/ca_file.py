"""One way to trust a private CA: a PEM file read as a bundle, every certificate in it a root.

Used by every TLS client here (``rediss://...?ssl_ca_certs=``, ``wss://`` with ``ca=``): a CA
file is commonly a bundle (several roots, or an old and a new one during a rotation), and the
certificate that issued the server's is not necessarily the first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.ssl import Certificate, trustRootFromCertificates

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # not exported by twisted.internet.ssl


class CAFileError(ValueError):
    """The CA file cannot be used; ``str()`` says why in one line."""


def load_ca_file(path: str) -> IOpenSSLTrustRoot:
    """Every certificate in the PEM file ``path`` (other PEM blocks are skipped) as trust roots."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CAFileError(f"cannot read CA file {path!r}: {e.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAFileError(f"no PEM certificate in {path!r}") from None
    return trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(c)) for c in certificates])
