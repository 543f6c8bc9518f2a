"""Why a connection did not open, as a user would say it: a refused upgrade (404: the server
does not serve the circle), a certificate that does not verify (an issuer not trusted, expired,
another host's, another CA of the same name), a ``ws://`` request to a TLS port.

:class:`ConnectFailed` and :class:`CertificateNotVerified` are the client's errors for these;
:func:`not_opened` picks the one that fits what the connection saw before it closed.
"""

from __future__ import annotations

import re
import ssl

from autobahn.websocket.util import parse_url
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure


class ConnectFailed(ConnectionError):
    """The connection or its opening handshake did not succeed (refused, TLS, HTTP 404...).

    ``status`` is the HTTP status of a refused upgrade (404: the server does not serve the
    circle), else None.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CertificateNotVerified(ConnectFailed):
    """The server's certificate did not verify: an issuer not trusted, expired, another host's."""


#: OpenSSL's verify errors for a chain that leads to no trusted root: unable to get issuer
#: certificate, self-signed certificate, self-signed certificate in chain, unable to get local
#: issuer certificate, unable to verify the first certificate.
_UNTRUSTED = {2, 18, 19, 20, 21}
#: OpenSSL's verify error for a certificate whose signature its issuer's key does not verify.
_BAD_SIGNATURE = 7


def _names(certificate: x509.Certificate) -> list:
    """The host names and addresses a certificate is for."""
    try:
        alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [a.value for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [*alternatives.get_values_for_type(x509.DNSName),
            *(str(a) for a in alternatives.get_values_for_type(x509.IPAddress))]


def not_verified(connection: SSL.Connection, ca: str | None, host: str, lost: Failure) -> str:
    """Why the server's certificate did not verify, in a few words (OpenSSL's reason for a chain
    that does not lead to a trusted root, or the names a certificate for another host carries)."""
    chain = connection.get_peer_cert_chain() or []
    if not chain:
        return lost.getErrorMessage()
    leaf = chain[0].to_cryptography()
    if lost.check(VerificationError):
        return f"it is for {', '.join(_names(leaf)) or 'no host name'}, not {host}"
    store = crypto.X509Store()
    try:
        if ca is not None:
            store.load_locations(ca)  # every certificate in it, as client_options trusts them
        else:
            paths = ssl.get_default_verify_paths()
            store.load_locations(paths.cafile, paths.capath)
        crypto.X509StoreContext(store, chain[0], chain=chain[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        # Expired, not yet valid, revoked...: OpenSSL's words say it. But a signature that fails
        # against the --ca file's CA is a CA of the issuer's name with another key: said below.
        if e.errors[0] not in _UNTRUSTED and not (ca is not None and e.errors[0] == _BAD_SIGNATURE):
            return f"{e}"
        issuer = leaf.issuer.rfc4514_string() or "an unnamed issuer"
        if ca is None:
            return f"{e} (issued by {issuer}, not in the system trust store)"
        return f"{e} (issued by {issuer}, {_other_ca(ca, leaf)})"
    except Exception:  # only the explanation is lost
        pass
    return "certificate verify failed"


def _other_ca(ca: str, leaf: x509.Certificate) -> str:
    """What the ``--ca`` file holds instead of the server's issuer, and the likely cause: another
    CA, or one of the same name and another key (a CA made again: a development CA's name is the
    same for every one it makes in older versions, and alike in newer ones)."""
    try:
        with open(ca, "rb") as f:
            held = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError):
        return f"not in {ca}"
    if any(cert.subject == leaf.issuer for cert in held):
        return (f"and {ca} holds a CA of that name but with another key: the server's certificate was signed "
                "by another CA of the same name (one made again, e.g. by another try-out run or state "
                "directory): give the CA file that signed it")
    names = "; ".join(cert.subject.rfc4514_string() or "an unnamed CA" for cert in held[:3])
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    return (f"but {ca} holds {names}{more}: the server's certificate was signed by another CA than that "
            "file's (made by another run or for another server?): give the CA file that signed it")


def not_opened(url: str, status_line: str, lost: Failure | None, tls: tuple | None, why: str) -> ConnectFailed:
    """Why the connection to ``url`` did not open, as a user would say it, from what it saw: the
    HTTP ``status_line`` of a refused upgrade, the failure it was ``lost`` with, the ``tls``
    (OpenSSL connection, CA file) it was made with over ``wss://``; else ``why`` (its close code
    and reason)."""
    _, host, port, resource, _, _ = parse_url(url)
    status = re.match(r"HTTP/\S+ (\d{3})\s*(.*)", status_line)
    if status and status.group(1) != "101":
        code, reason = int(status.group(1)), status.group(2).strip()
        if code == 404:
            circle = resource.split("?", 1)[0].rsplit("/", 1)[-1]
            return ConnectFailed(f"cannot open {url}: the server at {host}:{port} does not serve circle "
                                 f"{circle} (HTTP 404 {reason})", status=code)
        return ConnectFailed(f"cannot open {url}: the server at {host}:{port} refused the WebSocket upgrade "
                             f"(HTTP {code} {reason})", status=code)
    unverified = lost is not None and (lost.check(VerificationError) is not None or (
        lost.check(SSL.Error) is not None and "certificate verify failed" in str(lost.value)))
    if tls is not None and lost is not None and unverified:
        connection, ca = tls
        return CertificateNotVerified(f"cannot open {url}: certificate verify failed for {host}:{port}: "
                                      f"{not_verified(connection, ca, host, lost)}")
    if not url.startswith("wss:") and not status_line and lost is not None and lost.check(ConnectionDone):
        # A TLS port that read "GET ..." as a handshake closes without a word; so does a load
        # balancer with no server up behind it. The first is the one a user can fix here.
        return ConnectFailed(f"cannot open {url}: the connection closed before the WebSocket opened, with no "
                             f"answer: if {host}:{port} serves TLS, use wss:// (a TLS port closes a ws:// "
                             "request so; so does a load balancer with no server behind it)")
    return ConnectFailed(f"cannot open {url}: the connection closed before the WebSocket opened ({why})")
