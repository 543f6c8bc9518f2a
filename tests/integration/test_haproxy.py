"""examples/haproxy.cfg, run by Debian's haproxy in front of two ``twistd circles`` servers (one
real redis-server, one real worker) under a steady load of plays and signed Stripe webhooks, while
each server in turn is stopped (SIGTERM: drain, exit) and started again: a rolling upgrade.

What must hold: no play fails (one in flight on a stopping server is answered there), every
webhook is answered 200, every client reconnects; and with both servers gone, HAProxy answers a
webhook 503 with ``Retry-After``. The figures printed (``-s``) are those of docs/deployment.md.
Then the two TLS set-ups of the example's comments (TLS at HAProxy, TLS passed through), each made
as the comments say: a play and a webhook through it, and what a provider meets when Redis is down
for every server (each alive but unready: HAProxy has no server up).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from circles.client import ConnectionClosed, ReconnectingClient, RPCError
from circles.client.signing import generate, public_key
from devtools.deployment import OUTPUT, SCRIPT, STRIPE_SCRIPT, TINY_WORKER
from devtools.twistd import Twistd
from devtools.webhook_support import STRIPE_SECRET, encode, post, stripe_event, stripe_headers

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "haproxy.cfg"
CLIENTS = 6
THINK = 0.1  # seconds between a client's plays
WEBHOOKS_PER_SECOND = 10

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (scripts/setup installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(text: str, front: int, stats: int, servers: list[int]) -> str:
    """The example with this machine's addresses: nothing else is changed."""
    replaced = [("    bind :8080\n", f"    bind 127.0.0.1:{front}\n"),
                ("    bind 127.0.0.1:8404\n", f"    bind 127.0.0.1:{stats}\n"),
                ("    server a 10.0.0.11:8080 check\n", f"    server a 127.0.0.1:{servers[0]} check\n"),
                ("    server b 10.0.0.12:8080 check\n", f"    server b 127.0.0.1:{servers[1]} check\n")]
    for old, new in replaced:
        assert text.count(old) == 1, f"examples/haproxy.cfg no longer has {old!r}"
        text = text.replace(old, new)
    return text


def _once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"examples/haproxy.cfg no longer has {old!r} once"
    return text.replace(old, new)


def _tls_at_haproxy(text: str, front: int, pem: str) -> str:
    """The example's "TLS at HAProxy" change, as its comment writes it (this machine's address
    and PEM file)."""
    [bind] = re.findall(r"^    #   (bind :443 ssl crt /etc/haproxy/circles.pem alpn http/1.1)$", text, re.M)
    bind = bind.replace(":443", f"127.0.0.1:{front}").replace("/etc/haproxy/circles.pem", pem)
    return _once(text, f"    bind 127.0.0.1:{front}\n", f"    {bind}\n")


def _tls_passed_through(text: str, front: int, ca: str) -> str:
    """The example's "TLS passed through" changes, as its comment lists them."""
    [server] = re.findall(r"^    #   (server a 10.0.0.11:8443 check check-ssl .*)$", text, re.M)
    checks = server.split(" ", 3)[3].replace("/etc/haproxy/circles-ca.pem", ca)
    text = _once(text, f"    bind 127.0.0.1:{front}\n", f"    bind 127.0.0.1:{front}\n    mode tcp\n    option tcplog\n")
    text = _once(text, "    option forwardfor\n", "")
    text = _once(text, "    acl no_server nbsrv(circles) eq 0\n", "")
    text = re.sub(r"^    http-request return .* if no_server\n", "", text, count=1, flags=re.M)
    text = _once(text, "\nbackend circles\n", "\nbackend circles\n    mode tcp\n")
    return re.sub(r"^(    server [ab] \S+) check$", rf"\1 {checks}", text, flags=re.M)


def _rows(stats_port: int) -> dict:
    """HAProxy's statistics of the ``circles`` backend, by row (``a``, ``b``, ``BACKEND``)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=5) as response:
            lines = response.read().decode().lstrip("# ").splitlines()
    except OSError:  # not started yet
        return {}
    header = lines[0].split(",")
    rows = (dict(zip(header, line.split(","))) for line in lines[1:])
    return {row["svname"]: row for row in rows if row.get("pxname") == "circles"}


def _states(stats_port: int) -> dict:
    """Each server's state as HAProxy sees it (``UP``, ``DOWN``, ``UP 1/2``...)."""
    return {name: row["status"] for name, row in _rows(stats_port).items() if name in ("a", "b")}


#: What HAProxy counts when it meets a server that cannot take a request: connection errors,
#: response errors (a reset, an empty answer), retries and redispatches. Its retries hide these
#: from clients; a server that drains never causes them.
TROUBLE = ("econ", "eresp", "wretr", "wredis")


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _until(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate`` (blocking: in a thread) until true; the seconds it took."""
    began = time.monotonic()
    while not await deferToThread(predicate):
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what} within {timeout} s")
        await _sleep(0.1)
    return time.monotonic() - began


class _Load:
    """Clients playing in a loop through HAProxy, and a Stripe sender, until :meth:`stop`."""

    def __init__(self, front: int, circle: str) -> None:
        self.front = front
        self.circle = circle
        self.running = True
        self.plays: Counter = Counter()  # outcome: count
        self.resent = 0  # plays that crossed a 1001 close, sent again
        self.play_seconds: list[float] = []
        self.hooks: Counter = Counter()  # status: count
        self.hook_seconds: list[float] = []
        self.clients = [ReconnectingClient(f"ws://127.0.0.1:{front}/{circle}", reactor=reactor, key=generate(),
                                           timeout=10) for _ in range(CLIENTS)]
        self.loops: list = []

    def start(self) -> None:
        for client in self.clients:
            client.start()
        self.loops = [ensureDeferred(self._play_loop(c)) for c in self.clients] + [ensureDeferred(self._hook_loop())]

    async def _play_loop(self, client: ReconnectingClient) -> None:
        while self.running:
            began = reactor.seconds()
            self.plays[await self._play(client)] += 1
            self.play_seconds.append(reactor.seconds() - began)
            await _sleep(THINK)

    async def _play(self, client: ReconnectingClient) -> str:
        """A play's outcome. One sent as its server said 1001 (the close frame and the play
        crossed) was not run: the client library leaves that to us, and we send it again, as
        docs/deployment.md says an application may (counted apart: "resent after 1001")."""
        try:
            output = await client.play(SCRIPT, timeout=20)
            return "ok" if output == OUTPUT else f"wrong: {output!r}"
        except RPCError as e:
            return f"{e.code} {e.message}"
        except ConnectionClosed as e:
            if e.code != 1001:
                return f"ConnectionClosed: {e}"
        except Exception as e:  # counted: the assertion shows it
            return f"{type(e).__name__}: {e}"
        self.resent += 1
        return await self._play(client)

    async def _hook_loop(self) -> None:
        sent = []
        while self.running:
            sent.append(ensureDeferred(self._hook()))
            await _sleep(1 / WEBHOOKS_PER_SECOND)
        await DeferredList(sent, consumeErrors=True)

    async def _hook(self) -> None:
        body = encode(stripe_event(f"evt_haproxy_{uuid.uuid4().hex}"))
        began = reactor.seconds()
        try:
            reply = await post(self.front, f"/webhooks/stripe/{self.circle}", body, stripe_headers(body))
            self.hooks[reply.code] += 1
        except Exception as e:
            self.hooks[type(e).__name__] += 1
        self.hook_seconds.append(reactor.seconds() - began)

    async def stop(self) -> None:
        self.running = False
        await DeferredList(self.loops, consumeErrors=True)
        await DeferredList([client.stop() for client in self.clients], consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_rolling_upgrade_behind_haproxy(redis_server, tmp_path):
    circle = public_key(generate())
    secrets = tmp_path / "stripe.secrets"
    secrets.write_text(STRIPE_SECRET + "\n")
    secrets.chmod(0o600)
    script = tmp_path / "stripe.rhai"
    script.write_text(STRIPE_SCRIPT)
    ports = [_free_port(), _free_port()]
    front, stats = _free_port(), _free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(_config(EXAMPLE.read_text(), front, stats, ports))

    def server(i: int) -> Twistd:
        cwd = tmp_path / f"server{i}"
        cwd.mkdir(exist_ok=True)
        # --drain-grace and --shutdown-grace as shipped: the example's checks are made for them.
        return Twistd(["--port", str(ports[i]), "--interface", "127.0.0.1", "-k", circle, "--auth",
                       "--redis-url", redis_server.url, "--stripe-secret-file", str(secrets),
                       "--stripe-script", str(script)], cwd)

    (tmp_path / "worker").mkdir()
    worker = Twistd(["-k", circle, "--redis-url", redis_server.url, "--concurrency", "8", *TINY_WORKER],
                    tmp_path / "worker", plugin="circles-worker")
    servers = [server(0), server(1)]
    haproxy_log = open(tmp_path / "haproxy.log", "w")  # a file: a pipe nobody reads would stop it
    haproxy = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=haproxy_log, stderr=subprocess.STDOUT)
    load = None
    try:
        await _until(lambda: "waiting for tasks" in worker.output, 60, "the worker never waited for tasks")
        await _until(lambda: _states(stats) == {"a": "UP", "b": "UP"}, 60, "HAProxy never saw both servers up")
        load = _Load(front, circle)
        load.start()
        await _sleep(3)  # steady load on both
        figures = {}
        for i, name in enumerate("ab"):
            sigterm = time.monotonic()
            servers[i].proc.terminate()
            down = await _until(lambda: _states(stats).get(name, "").startswith("DOWN"), 20, f"HAProxy never took {name} out")  # noqa: B023
            await deferToThread(servers[i].proc.wait, 30)
            exited = time.monotonic() - sigterm
            # Twisted ends by re-raising the signal that stopped it: -15 is a clean exit.
            assert servers[i].proc.returncode in (0, -15), servers[i].output[-3000:]
            assert "still accepting for 5s (--drain-grace)" in servers[i].output, servers[i].output[-3000:]
            servers[i] = server(i)
            up = await _until(lambda: _states(stats).get(name, "") == "UP", 60, f"HAProxy never took {name} back")  # noqa: B023
            figures[name] = {"marked down after": round(down, 1), "exited after": round(exited, 1),
                             "back up after": round(exited + up, 1)}
        await _sleep(2)  # the load on both again
        connections_before_end = [c.connections for c in load.clients]
        trouble = {name: int(_rows(stats)["BACKEND"][name] or 0) for name in TROUBLE}
        await load.stop()
        load_ = load
        load = None
        print("\nrolling upgrade behind HAProxy:", json.dumps({
            "plays": dict(load_.plays), "resent after 1001": load_.resent, "slowest play (s)": round(max(load_.play_seconds), 2),
            "webhooks": {str(k): v for k, v in load_.hooks.items()},
            "slowest webhook (s)": round(max(load_.hook_seconds), 2),
            "connections per client": connections_before_end, "HAProxy's errors and retries": trouble,
            "restarts": figures}, indent=1))
        assert set(load_.plays) == {"ok"}, load_.plays
        assert set(load_.hooks) == {200}, load_.hooks
        assert trouble == dict.fromkeys(TROUBLE, 0), trouble
        # Each client reconnected at least once (its first server stopped) and was live at the end.
        assert all(n >= 2 for n in connections_before_end), connections_before_end

        # Both servers gone: HAProxy has no backend and answers webhooks itself, 503 + Retry-After.
        for s in servers:
            s.proc.kill()
        await _until(lambda: _states(stats) == {"a": "DOWN", "b": "DOWN"}, 20, "HAProxy never saw both down")
        body = encode(stripe_event("evt_haproxy_nobody"))
        reply = await post(front, f"/webhooks/stripe/{circle}", body, stripe_headers(body))
        assert (reply.code, reply.header("retry-after")) == (503, "30"), reply
        assert reply.json() == {"error": "no server available, retry later"}
    finally:
        if load is not None:
            await load.stop()
        haproxy.terminate()
        haproxy.wait(10)
        haproxy_log.close()
        for process in (*servers, worker):
            process.stop()
    for process in servers:
        assert "Traceback" not in process.output, process.output[-3000:]


def _https_post(front: int, path: str, body: bytes, headers: dict, ca: str) -> tuple:
    """A provider's POST over https to HAProxy: (status, Retry-After, JSON answer)."""
    context = ssl.create_default_context(cafile=ca)
    request = urllib.request.Request(f"https://localhost:{front}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, response.headers.get("Retry-After"), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Retry-After"), json.loads(e.read())


@pytest.mark.parametrize("tls", ["at haproxy", "passed through"])
@pytest_twisted.ensureDeferred
async def test_tls_at_haproxy_or_passed_through(redis_server, tmp_path, tls_files, tls):
    """Either TLS set-up the example's comments describe, made as they say: HAProxy checks /ready
    (over TLS when passed through), a wss:// client plays and an https webhook is answered 200
    through it. Then Redis stops: the server is alive (/health) but not ready (/ready), so HAProxy
    has no server up; TLS at HAProxy then answers 503 with Retry-After, and passed through,
    HAProxy sees no HTTP and closes the connection, as the comment says."""
    circle = public_key(generate())
    secrets = tmp_path / "stripe.secrets"
    secrets.write_text(STRIPE_SECRET + "\n")
    secrets.chmod(0o600)
    port, front, stats = _free_port(), _free_port(), _free_port()
    text = _config(EXAMPLE.read_text(), front, stats, [port, port])  # both lines: the one server
    if tls == "at haproxy":
        text, own_tls = _tls_at_haproxy(text, front, tls_files["combined"]), []
    else:
        text, own_tls = _tls_passed_through(text, front, tls_files["ca"]), ["--tls-cert", tls_files["cert"],
                                                                           "--tls-key", tls_files["key"]]
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    checked = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "WARNING" not in checked.stderr + checked.stdout, checked.stderr
    (tmp_path / "server").mkdir()
    (tmp_path / "worker").mkdir()
    server = Twistd(["--port", str(port), "--interface", "127.0.0.1", "-k", circle, "--auth", "--redis-url",
                     redis_server.url, "--stripe-secret-file", str(secrets), *own_tls], tmp_path / "server")
    worker = Twistd(["-k", circle, "--redis-url", redis_server.url, *TINY_WORKER], tmp_path / "worker",
                    plugin="circles-worker")
    haproxy_log = open(tmp_path / "haproxy.log", "w")
    haproxy = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=haproxy_log, stderr=subprocess.STDOUT)
    client = ReconnectingClient(f"wss://localhost:{front}/{circle}", reactor=reactor, key=generate(),
                                ca=tls_files["ca"], timeout=10)
    try:
        await _until(lambda: "waiting for tasks" in worker.output, 60, "the worker never waited for tasks")
        await _until(lambda: _states(stats) == {"a": "UP", "b": "UP"}, 60, "HAProxy never saw the server up")
        client.start()
        assert await client.play(SCRIPT, timeout=20) == OUTPUT
        await client.stop()
        body = encode(stripe_event(f"evt_tls_{tls.replace(' ', '_')}"))
        hook = f"/webhooks/stripe/{circle}"
        status, _, answer = await deferToThread(_https_post, front, hook, body, stripe_headers(body), tls_files["ca"])
        assert (status, answer["received"]) == (200, True), answer

        # Redis down for every server (here the one): each /ready 503, so HAProxy has no backend,
        # while /health (liveness) still says the process lives: nothing to restart.
        redis_server.kill()
        await _until(lambda: _states(stats) == {"a": "DOWN", "b": "DOWN"}, 20, "HAProxy never saw the server down")
        scheme = "https" if own_tls else "http"
        context = ssl.create_default_context(cafile=tls_files["ca"]) if own_tls else None
        for path, expected in (("/health", 200), ("/ready", 503)):
            try:
                with urllib.request.urlopen(f"{scheme}://localhost:{port}{path}", timeout=10, context=context) as got:
                    status = got.status
            except urllib.error.HTTPError as e:
                status = e.code
            assert status == expected, path
        body = encode(stripe_event(f"evt_tls_nobody_{tls.replace(' ', '_')}"))
        if tls == "at haproxy":
            answer = await deferToThread(_https_post, front, hook, body, stripe_headers(body), tls_files["ca"])
            assert answer == (503, "30", {"error": "no server available, retry later"}), answer
        else:
            with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
                await deferToThread(_https_post, front, hook, body, stripe_headers(body), tls_files["ca"])
    finally:
        await client.stop()
        haproxy.terminate()
        haproxy.wait(10)
        haproxy_log.close()
        for process in (server, worker):
            process.stop()
    assert "Traceback" not in server.output, server.output[-3000:]
