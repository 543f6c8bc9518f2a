"""Make a development CA and a server certificate for localhost, for trying circles over wss.

    python -m circles.tryout.devcert DIR [--host NAME ...]

writes ``DIR/ca.pem`` (the CA certificate clients trust), ``DIR/cert.pem`` (the server's
certificate followed by the CA) and ``DIR/key.pem`` (the server's key, mode 0600). The CA's own
key is thrown away, so the CA can vouch for this one certificate and nothing else. Not for
production: use certificates from your own CA or ACME there.

Each CA is named apart (:func:`ca_common_name`: the machine, the day and a random suffix): a
client given another run's ``ca.pem`` (or a browser trusting an older one) is told which CA the
server's certificate names, and that it is not the one trusted, instead of two CAs of one name.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import socket
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALIDITY = datetime.timedelta(days=30)
CA_NAME = "circles development CA"


def ca_common_name(now: datetime.datetime) -> str:
    """A development CA's CN, unique per generation: ``circles development CA <host> <date> <hex>``."""
    host = socket.gethostname().split(".")[0] or "localhost"
    return f"{CA_NAME} {host} {now:%Y-%m-%d} {secrets.token_hex(3)}"


def _subject_names(hosts: Iterable[str]) -> list:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make(directory: str, hosts: Iterable[str] = DEFAULT_HOSTS, now: datetime.datetime | None = None) -> dict:
    """Write ca.pem, cert.pem and key.pem into ``directory``; return their paths by name."""
    hosts = list(hosts)
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name(now))])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.pem") for name in ("ca", "cert", "key")}
    pem = serialization.Encoding.PEM
    with open(paths["ca"], "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make a development TLS certificate for circles.")
    parser.add_argument("directory", help="where to write ca.pem, cert.pem and key.pem")
    parser.add_argument("--host", action="append", help="DNS name or IP the certificate names (repeatable)")
    args = parser.parse_args(argv)
    paths = make(args.directory, args.host or DEFAULT_HOSTS)
    print(f"wrote {paths['cert']} and {paths['key']}; clients trust {paths['ca']}")


if __name__ == "__main__":
    main()
