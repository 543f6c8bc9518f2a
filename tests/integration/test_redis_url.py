"""rediss:// against a real TLS redis-server: certificates and host names checked (the URLs
parsed: tests/unit/test_redis_url.py)."""

import pytest
import pytest_twisted

from circles.backend.redis_url import parse_redis_url


def _tls_redis(tmp_path, hostname):
    import subprocess

    import trustme

    from devtools.redis_server import REDIS_SERVER, free_port

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    ca = trustme.CA()
    cert = ca.issue_cert(hostname)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    port = free_port()
    process = subprocess.Popen([REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                                "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
                                "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
                                "--save", "", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port


@pytest.mark.parametrize("cert_name, works", [("localhost", True), ("redis.elsewhere.example", False)])
@pytest_twisted.ensureDeferred
async def test_rediss_checks_certificate_and_hostname(tmp_path, cert_name, works):
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import connectProtocol
    from twisted.internet.protocol import Protocol

    from ..play_client import sleep

    process, port = _tls_redis(tmp_path, cert_name)
    try:
        address = parse_redis_url(f"rediss://localhost:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}")

        class Ping(Protocol):
            def connectionMade(self):
                self.answer = Deferred()
                self.transport.write(b"PING\r\n")

            def dataReceived(self, data):
                if not self.answer.called:
                    self.answer.callback(data)

            def connectionLost(self, reason):
                if not self.answer.called:
                    self.answer.errback(reason)

        async def ping():
            protocol = await connectProtocol(address.endpoint(reactor), Ping())
            return await protocol.answer

        for _ in range(200):  # until redis-server listens
            try:
                answer = await ping()
                break
            except Exception as e:
                error = e
                if "refused" not in str(e).lower():
                    break
                await sleep(0.05)
        if works:
            assert answer.startswith(b"+PONG")
        else:
            from service_identity import VerificationError
            assert isinstance(error, VerificationError), error  # the hostname check refused it
    finally:
        process.kill()
        process.wait()


@pytest_twisted.ensureDeferred
async def test_rediss_trusts_every_certificate_of_a_ca_bundle(tmp_path):
    """``ssl_ca_certs`` is a bundle: the CA that issued Redis's certificate may be the second."""
    import trustme
    from twisted.internet import reactor

    from circles.backend.redis import connect

    from ..play_client import eventually

    process, port = _tls_redis(tmp_path, "localhost")
    factory = None
    try:
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(trustme.CA().cert_pem.bytes() + (tmp_path / "ca.pem").read_bytes())
        factory = connect(parse_redis_url(f"rediss://localhost:{port}/0?ssl_ca_certs={bundle}"), reactor)
        await eventually(lambda: factory.size > 0)
        assert await factory.handler.ping() == "PONG"
    finally:
        if factory is not None:
            await factory.disconnect()
        process.kill()
        process.wait()
