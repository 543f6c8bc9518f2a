from pathlib import Path

import pytest
import pytest_twisted
import trustme
from twisted.internet.defer import maybeDeferred

from devtools.redis_server import REDIS_SERVER, RedisProcess, ReplicatedRedis

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Mark each test by its directory: tests/unit is ``unit``, tests/integration ``integration``
    (the markers are registered in pytest.ini), so ``-m unit`` selects the same tests as the path."""
    for item in items:
        try:
            kind = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if kind in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session", autouse=True)
def direct_loop():
    """The reactor's loop as twistd runs it for the server and the worker (both plugins call
    serve_events_directly): each event served by a direct call, and TurnEnd's calls at the end
    of each turn. The services started in process are tested on that loop, not Twisted's own."""
    from twisted.internet import reactor

    from circles.common.event_loop import serve_events_directly

    assert serve_events_directly(reactor), f"not an epoll reactor: {reactor!r}"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A test CA (trustme) and a server certificate for localhost/127.0.0.1, as PEM files."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    directory = tmp_path_factory.mktemp("tls")
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem",
             "combined": directory / "combined.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["combined"]))
    return {name: str(path) for name, path in paths.items()}


@pytest_twisted.async_yield_fixture
async def start():
    """``start(service)`` starts a Twisted service and stops it, if still running, after the
    test (in reverse order of starting)."""
    started = []

    def _start(service):
        service.startService()
        started.append(service)
        return service

    yield _start
    for service in reversed(started):
        if service.running:
            await maybeDeferred(service.stopService)


# --- real redis-servers (devtools/redis_server.py) --------------------------------------------

@pytest.fixture
def redis_server(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(str(tmp_path))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def replicated_redis(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    redis = ReplicatedRedis(str(tmp_path))
    try:
        redis.start()
        yield redis
    finally:
        redis.stop()
