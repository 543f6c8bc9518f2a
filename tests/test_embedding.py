"""CirclesService embedded in a larger Twisted application's service tree."""

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import reactor, threads
from websockets.sync.client import connect

from circles import CirclesService, Config
from circles import tls as circles_tls

from .support import Key, authenticate, client_tls, request


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


def test_log_level_drops_events_below_it():
    from twisted.logger import globalLogPublisher

    from circles import logs

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
