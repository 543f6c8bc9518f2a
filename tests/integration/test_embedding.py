"""CirclesService embedded in a larger Twisted application's service tree."""

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import reactor, threads
from websockets.sync.client import connect

from circles import CirclesService, Config
from circles.server import tls as circles_tls

from ..support import Key, authenticate, client_tls, request


def _session(url: str, user: Key, ca: str = None) -> list:
    """A whole client session, run in a thread (the websockets sync client blocks)."""
    with connect(url, ssl=client_tls(ca) if ca else None) as ws:
        return [authenticate(ws, user)["result"], request(ws, "whoami")["result"]]


@pytest_twisted.ensureDeferred
async def test_service_in_an_application_tree(tls_files):
    circle, user = Key(), Key()
    config = Config(circles=[circle.pubkey], auth_required=True,
                    listen=("tcp:0:interface=127.0.0.1",), nonce_ttl=60)
    application = MultiService()  # stands for the larger application
    service = CirclesService(config, reactor=reactor)
    service.setServiceParent(application)
    application.startService()
    try:
        [port] = await service.when_listening()
        url = f"ws://127.0.0.1:{port.getHost().port}/{circle.pubkey}"
        authenticated, identity = await threads.deferToThread(_session, url, user)
        assert authenticated == {"authenticated": True, "pubkey": user.pubkey}
        assert identity == {"circle": circle.pubkey, "authenticated": True, "pubkey": user.pubkey}
    finally:
        await application.stopService()
    with pytest.raises(OSError):
        await threads.deferToThread(_session, url, user)


@pytest_twisted.ensureDeferred
async def test_service_with_tls(tls_files):
    circle, user = Key(), Key()
    config = Config(circles=[circle.pubkey], port=0, interface="127.0.0.1",
                    tls=circles_tls.load(tls_files["cert"], tls_files["key"]))
    service = CirclesService(config, reactor=reactor)
    service.startService()
    try:
        [port] = await service.when_listening()
        url = f"wss://localhost:{port.getHost().port}/{circle.pubkey}"
        authenticated, _ = await threads.deferToThread(_session, url, user, tls_files["ca"])
        assert authenticated["pubkey"] == user.pubkey
    finally:
        await service.stopService()


def _curl(url: str, ca: str):
    import subprocess
    return subprocess.run(["curl", "-sS", "--cacert", ca, url], capture_output=True, text=True, timeout=60)


@pytest_twisted.ensureDeferred
async def test_service_with_the_applications_own_tls_options_serves_alpn_clients(tls_files):
    """An application may bring TLS options of its own (Twisted's CertificateOptions, with no
    ALPN list): the listening factory names http/1.1, so curl and browsers still connect."""
    from OpenSSL import crypto
    from twisted.internet.ssl import CertificateOptions

    with open(tls_files["key"], "rb") as f:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
    with open(tls_files["cert"], "rb") as f:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
    config = Config(circles=[Key().pubkey], port=0, interface="127.0.0.1",
                    tls=CertificateOptions(privateKey=key, certificate=cert))
    service = CirclesService(config, reactor=reactor)
    service.startService()
    try:
        [port] = await service.when_listening()
        result = await threads.deferToThread(_curl, f"https://localhost:{port.getHost().port}/health", tls_files["ca"])
        assert result.returncode == 0 and result.stdout == '{"status":"ok"}', result.stderr
    finally:
        await service.stopService()


def test_log_level_drops_events_below_it():
    from twisted.logger import globalLogPublisher

    from circles.common import logs

    events = []
    globalLogPublisher.addObserver(events.append)
    log = logs.Logger(namespace="circles.test")
    try:
        log.debug("hidden at info")
        log.info("shown at info")
        logs.set_level("debug")
        log.debug("shown at debug")
        logs.set_level("warn")
        log.info("hidden at warn")
    finally:
        logs.set_level("info")
        globalLogPublisher.removeObserver(events.append)
    assert [e["log_format"] for e in events if e.get("log_namespace") == "circles.test"] == \
        ["shown at info", "shown at debug"]
