"""TLS for the listening ports: PEM files in, Twisted server options with our policy out.

The policy (docs/tls.md):

- **Versions**: TLS 1.2 and 1.3 only.
- **Ciphers**: Mozilla's "intermediate" profile. For TLS 1.2 only ECDHE key exchange (forward
  secrecy) with AES-GCM or ChaCha20-Poly1305; no static RSA, no CBC, no SHA-1 MACs, no RC4,
  3DES or NULL. (The profile's DHE suites are left out: we ship no DH parameters.) TLS 1.3
  suites are OpenSSL's, all of them AEAD. ``--tls-ciphers`` sets another OpenSSL cipher
  string for TLS 1.2, checked at start-up.
- **ALPN**: ``http/1.1`` is offered. Since Twisted 25 every server context answers ALPN, and
  with nothing to offer Twisted selects nothing and OpenSSL aborts the handshake ("tlsv1
  alert internal error"): every browser, curl and most HTTP libraries send ALPN. A WebSocket
  upgrade is HTTP/1.1 (RFC 6455; RFC 8441's HTTP/2 WebSockets are not served), so a client
  that offers only other protocols (``h2`` alone) is refused with the ``no_application_protocol``
  alert, as RFC 7301 says (Twisted's own callback would send ``internal_error``), and a
  client that offers no ALPN is served as before.

Every way the files can be wrong (missing, unreadable, not PEM, key not matching the
certificate) and a cipher string that selects nothing are one :class:`TLSError` with a
one-line message for the operator.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib  # the OpenSSL bindings pyOpenSSL itself calls
from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, DiffieHellmanParameters, TLSVersion
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from zope.interface import implementer

from circles.common.event_loop import TurnEnd

#: Mozilla's intermediate profile (version 5.7) for TLS 1.2, less the DHE suites.
DEFAULT_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])

#: What ALPN offers: a WebSocket upgrade (and every other route here) is HTTP/1.1.
ALPN_PROTOCOLS = (b"http/1.1",)


class TLSError(Exception):
    """The certificate, key or cipher string cannot be used; ``str()`` is the operator's
    one-line message."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read TLS {what} {path!r}: {e.strerror}") from None


def _public_der(has_public_key) -> bytes:
    """The DER public key of a private key or a certificate, to compare the two."""
    return has_public_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def tls12_ciphers(cipher_string: str) -> list:
    """The TLS 1.2 suites an OpenSSL cipher string selects here (TLS 1.3's are not set by it).

    Raises :class:`TLSError` when it selects none, so a typo stops start-up with one line
    instead of a server that refuses every TLS 1.2 client.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(cipher_string.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise TLSError(f"--tls-ciphers {cipher_string!r} selects no cipher OpenSSL knows") from None
    names = [name for name in SSL.Connection(context, None).get_cipher_list() if not name.startswith("TLS_")]
    if not names:
        raise TLSError(f"--tls-ciphers {cipher_string!r} selects no TLS 1.2 cipher")
    return names


def server_options(private_key: crypto.PKey, certificate: crypto.X509, chain: tuple = (),
                   ciphers: str | None = None, dh_parameters=None) -> CertificateOptions:
    """Twisted server options for a key and certificate with the policy above.

    ``ciphers`` is an OpenSSL cipher string for TLS 1.2 (default :data:`DEFAULT_CIPHERS`).
    """
    names = tls12_ciphers(DEFAULT_CIPHERS if ciphers is None else ciphers)
    options = CertificateOptions(
        privateKey=private_key,
        certificate=certificate,
        extraCertChain=list(chain),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(":".join(names)),
        acceptableProtocols=list(ALPN_PROTOCOLS),
        dhParameters=dh_parameters,
    )
    # Twisted builds one context per options object and makes every connection from it; our
    # selection replaces the callback it installed there (see the module docstring).
    options.getContext().set_alpn_select_callback(_select_alpn)
    return options


class NoApplicationProtocol(SSL.Error):
    """The client offered ALPN protocols, none of them ours. Raised from the ALPN callback,
    which makes OpenSSL end the handshake with the ``no_application_protocol`` alert."""


def _select_alpn(connection: SSL.Connection, offered: list) -> bytes:
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
    # Shaped as OpenSSL's error queue, which is what Twisted reads from a handshake failure.
    raise NoApplicationProtocol([("SSL routines", "tls_handle_alpn", "no application protocol")])


def load(cert_path: str, key_path: str | None = None, ciphers: str | None = None, *,
         extra_chain: str | None = None, dh_parameters: str | None = None) -> CertificateOptions:
    """Build server TLS options from a PEM certificate (chain) and a PEM private key.

    ``key_path`` may be None when the key is in the certificate file. Certificates after the
    first in ``cert_path`` are sent as the chain, then those of ``extra_chain`` (a PEM file) if
    given. ``dh_parameters``: a PEM file of Diffie-Hellman parameters. ``ciphers``: see
    :func:`server_options`.
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
    if extra_chain is not None:
        try:
            chain += x509.load_pem_x509_certificates(_read(extra_chain, "certificate chain"))
        except ValueError:
            raise TLSError(f"no PEM certificate in {extra_chain!r}") from None
    dh = None
    if dh_parameters is not None:
        _read(dh_parameters, "DH parameters")  # there and readable: OpenSSL reads it as the context is made
        dh = DiffieHellmanParameters.fromFile(FilePath(dh_parameters))
    # The key matches the certificate's, so it is of a kind a certificate holds (RSA, EC, Ed25519...).
    return server_options(crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
                          crypto.X509.from_cryptography(chain[0]),
                          tuple(crypto.X509.from_cryptography(c) for c in chain[1:]), ciphers, dh)


def endpoint_parameters(description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and named parameters of a Twisted endpoint string, read as
    ``serverFromString`` reads them: separated by ``:``, the first ``=`` of one making it
    ``name=value``, a backslash quoting the next character."""
    params = [[""]]
    chars = iter(description)
    for char in chars:
        if char == ":":
            params.append([""])
        elif char == "=" and len(params[-1]) == 1:
            params[-1].append("")
        elif char == "\\":
            quoted = next(chars, None)
            if quoted is None:
                raise ValueError("it ends in a backslash, which quotes nothing")
            params[-1][-1] += quoted
        else:
            params[-1][-1] += char
    args = [param[0] for param in params if len(param) == 1]
    kwargs = {param[0]: param[1] for param in params if len(param) == 2}
    return args, kwargs


class _TLSTransport(BufferingTLSTransport):
    """Twisted's TLS transport, which asks OpenSSL for ciphertext to send only when there is some.

    Twisted's ``_flushSendBIO`` reads the outgoing memory BIO after every read from the peer and
    every write: when it is empty, which it is after almost every read, pyOpenSSL's ``bio_read``
    raises ``WantReadError``, some 2.4 us of the server's CPU a request. The BIO's length is
    read first (pyOpenSSL's ``Connection._from_ssl``, as :func:`release_buffers` reads it)."""

    def _flushSendBIO(self) -> None:
        out = getattr(self._tlsConnection, "_from_ssl", None)
        if out is not None and not lib.BIO_get_mem_data(out, ffi.NULL):
            return  # nothing to send: bio_read would raise WantReadError
        super()._flushSendBIO()


class _Connection(SSL.Connection):
    """pyOpenSSL's connection, whose ``recv`` says at once that there is nothing to read when
    there is nothing: no ciphertext in its incoming memory BIO and no plaintext decrypted and
    not yet read (``SSL_pending``).

    Twisted's ``_flushReceiveBIO`` calls ``recv`` until it raises ``WantReadError``, so every
    read from the peer ends with one ``SSL_read`` on an empty BIO, the error looked up and
    a 32 KiB buffer allocated for nothing: 1.3 us of the server's CPU a request. OpenSSL reads
    no further ahead than the record it needs (``read_ahead`` is off: Twisted and we leave it
    so), so when both are empty ``SSL_read`` has nothing to work on. After ``bio_shutdown``
    the question goes to OpenSSL again, whose answer is then the end of the stream."""

    _at_eof = False

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        if not (self._at_eof or lib.BIO_get_mem_data(self._into_ssl, ffi.NULL) or lib.SSL_pending(self._ssl)):
            raise SSL.WantReadError()
        return super().recv(bufsiz, flags)

    def bio_shutdown(self) -> None:
        super().bio_shutdown()
        self._at_eof = True


@implementer(IOpenSSLServerConnectionCreator)
class _ConnectionCreator:
    """Server connections from Twisted's options, as Twisted makes them from a context factory
    (one ``Connection`` on the options' context, with memory BIOs), of the class above."""

    def __init__(self, options: CertificateOptions) -> None:
        self._options = options

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return _Connection(self._options.getContext(), None)


class _TLSFactory(TLSMemoryBIOFactory):
    protocol = _TLSTransport


def tls_factory(reactor: Any, options: CertificateOptions, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
    """Server TLS over ``factory``'s connections, as Twisted's ``listenSSL`` wraps it, with three
    differences, for 11% fewer instructions a ``whoami`` over ``wss://`` (docs/benchmarks.md,
    "The end of a turn" and after). What a connection writes over a turn of the reactor (a WebSocket's
    reply frames) is encrypted and sent at the end of that turn
    (:class:`circles.common.event_loop.TurnEnd`), not from a ``DelayedCall`` of its own on the
    next turn's timers: the records are the same, a turn's writes in one. And the transport
    looks for ciphertext to send only when there is some (:class:`_TLSTransport`), and for
    plaintext to read only when there can be some (:class:`_Connection`)."""
    return _TLSFactory(_ConnectionCreator(options), False, factory, clock=TurnEnd(reactor))


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Twisted's ``SSL4ServerEndpoint``, listening with :func:`tls_factory`'s TLS."""

    def __init__(self, reactor: Any, port: int, options: CertificateOptions, backlog: int = 50,
                 interface: str = "") -> None:
        self._reactor = reactor
        self._port = port
        self._options = options
        self._backlog = backlog
        self._interface = interface

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        port = self._reactor.listenTCP(self._port, tls_factory(self._reactor, self._options, factory),
                                       backlog=self._backlog, interface=self._interface)
        port._type = "TLS"  # as listenSSL names it: "Site (TLS) starting on 443"
        return port


def ssl_endpoint(reactor, description: str, ciphers: str | None = None) -> TLSServerEndpoint | None:
    """The endpoint of an ``ssl:`` endpoint string with our policy (ALPN, versions, ``ciphers``)
    instead of Twisted's defaults, which accept static RSA and CBC; None for another kind of
    endpoint. Its parameters are Twisted's (``ssl:PORT:privateKey=KEY:certKey=CERT``, with
    ``interface``, ``backlog``, ``extraCertChain``, ``dhParameters``); its files are read as
    ``--tls-cert``/``--tls-key`` are (:func:`load`: :class:`TLSError` if they cannot be used).
    A ``TypeError`` or ``ValueError`` says that the string is not a valid ``ssl:`` endpoint."""
    args, kwargs = endpoint_parameters(description)
    if args[0] != "ssl":
        return None
    return _ssl_endpoint(reactor, ciphers, *args[1:], **kwargs)


def _ssl_endpoint(reactor, ciphers, port, privateKey="server.pem", certKey=None, sslmethod=None, interface="",
                  backlog=50, extraCertChain=None, dhParameters=None) -> TLSServerEndpoint:
    # Twisted's ssl: parameters, named and ordered as its parser takes them. ``sslmethod`` is
    # accepted and not used: the versions are the policy's (TLS 1.2 and 1.3).
    options = load(privateKey if certKey is None else certKey, privateKey, ciphers,
                   extra_chain=extraCertChain, dh_parameters=dhParameters)
    return TLSServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)


def release_buffers(connection: object) -> bool:
    """Let go of what the memory BIOs of ``connection`` keep between records; whether it could.

    Twisted's TLS speaks to OpenSSL through two memory BIOs (a pyOpenSSL ``Connection`` made
    without a socket): ciphertext read goes into one, ciphertext to send comes out of the other.
    A memory BIO keeps the largest buffer it ever needed, so an idle TLS connection held its
    opening handshake's flights (2.3 kB with TLS 1.3) and one that ever read 64 KiB at once
    (a large message) held 85 kB, for as long as it lived. ``SSL_MODE_RELEASE_BUFFERS`` frees
    OpenSSL's record buffers, not these.

    When both BIOs are empty, they are replaced by new, empty ones (``SSL_set_bio`` frees the
    old); otherwise (ciphertext on its way, or not a memory-BIO connection) nothing is done.
    Relies on pyOpenSSL's ``Connection._ssl``, ``_into_ssl`` and ``_from_ssl`` (pinned in
    tests/integration/test_dependencies.py).
    """
    into, out = getattr(connection, "_into_ssl", None), getattr(connection, "_from_ssl", None)
    if not isinstance(connection, SSL.Connection) or into is None or out is None:
        return False
    if lib.BIO_get_mem_data(into, ffi.NULL) or lib.BIO_get_mem_data(out, ffi.NULL):
        return False  # ciphertext on its way in or out
    new_into, new_out = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
    if new_into == ffi.NULL or new_out == ffi.NULL:
        for bio in (new_into, new_out):
            if bio != ffi.NULL:
                lib.BIO_free(bio)
        return False
    lib.SSL_set_bio(connection._ssl, new_into, new_out)  # owns the new two, frees the old two
    connection._into_ssl, connection._from_ssl = new_into, new_out
    return True
