"""The one way every TLS client here (``wss://`` from :mod:`circles.client`, ``rediss://`` from
:mod:`circles.backend.redis_url`) verifies its server: the certificate and host name
(service-identity) against the platform's trust store or a private CA file, TLS 1.2 at least.

A CA file is read as a bundle, every certificate in it a root: a CA file is commonly several
roots (or an old and a new one during a rotation), and the certificate that issued the server's
is not necessarily the first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS, trustRootFromCertificates

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # not exported by twisted.internet.ssl
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator


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


def client_options(host: str, ca: str | None = None) -> IOpenSSLClientConnectionCreator:
    """TLS options for a connection to ``host``: verified against the CA file ``ca`` when given
    (:class:`CAFileError` if it cannot be used), else the platform's trust store."""
    trust_root = None if ca is None else load_ca_file(ca)  # None: optionsForClientTLS's platform trust
    return optionsForClientTLS(host, trustRoot=trust_root, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})
