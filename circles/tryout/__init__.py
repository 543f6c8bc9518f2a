"""The one-command try-out (``./scripts/try``, ``circles try``, ``python -m circles.tryout``).

Brings up, on this machine and bound to 127.0.0.1 only: the server with ``--auth``, TLS from a
development CA (:mod:`circles.tryout.devcert`) and the playground, its private Redis, one circle, and a
reference worker; then prints the URLs and a ``circles play`` line to paste. Ctrl-C (or SIGTERM)
stops the worker, then the server (which stops Redis), and returns once all have exited.

Each child runs in its own session, so the terminal's Ctrl-C reaches only this supervisor,
which stops them in order; and each asks the kernel for SIGTERM should the supervisor die
(``PR_SET_PDEATHSIG``), so even a killed supervisor leaves nothing behind.

State lives in ``--state-dir`` (default ``./state``): ``certs/`` (the CA clients trust), the
circle's key, a user key for the pasted line, ``webhooks/`` (a signing secret and a handler script
per provider, so docs/webhooks.md's example runs here), logs, and the Redis socket. One try-out at a time
holds a state directory (``try.lock``); each start moves the previous run's ``logs/*.log`` to
``*.log.1``.

The worker's engine is :mod:`circles.worker.tiny_engine` (a sandboxed subset of Rhai;
why not ``sh`` is said there); ``--exec 'rhai-run {script_file}'`` runs real Rhai instead.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import re
import secrets
import shlex
import shutil
import signal
import sys

from cryptography import x509
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import react
from twisted.python.failure import Failure

from circles.client import signing
from circles.common.children import dies_with_this_process, terminate
from circles.common.once import Once

DEFAULT_PORT = 8443
INTERFACE = "127.0.0.1"
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
EXAMPLE_SCRIPT = 'let x = 6 * 7; print("hello, " + CALLER_ID); x'
#: The script queued for each webhook event (``--stripe-script``, ``--idenfy-script``): the
#: server's default call, after a handler the user may edit (the tiny engine defines none).
WEBHOOK_HANDLERS = {
    "stripe": ("on_stripe_event", "a Stripe event", "whsec_"),
    "idenfy": ("on_idenfy_callback", "an iDenfy verification callback", ""),
}
WEBHOOK_SCRIPT = """// The try-out's handler of {what} (docs/webhooks.md, "On the try-out").
// The server queues this text for each one; its JSON text is CIRCLES_DATA. Edit the handler and
// restart the try-out. Nobody waits for a webhook's output: its task's status (completed, or
// error with a line in the worker's log) is what is kept.
fn {handler}(event) {{
    print(event);
}}

{handler}(CIRCLES_DATA)
"""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _bin(name: str) -> str:
    """A console script of this environment (the venv's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"circles try: {name} not found")
    return found


def _shown(path: str) -> str:
    """``path`` as printed: absolute, since what is printed is pasted into another terminal,
    often in another directory."""
    return os.path.abspath(path)


# -- state: certificate and keys ----------------------------------------------------------------

def _certificate_fresh(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=1)


def _kept(path: str, text) -> str:
    """``path``, written (mode 0600) with ``text()`` unless it exists: the user's edits stay."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text())
    return path


def prepare(state_dir: str) -> dict:
    """Make what is missing in ``state_dir``: a development certificate (renewed before it
    expires), the circle's key and a user key. Returns the paths and the circle id."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    certs = os.path.join(state_dir, "certs")
    paths = {name: os.path.join(certs, f"{name}.pem") for name in ("ca", "cert", "key")}
    if not all(os.path.exists(p) for p in paths.values()) or not _certificate_fresh(paths["cert"]):
        # Imported here, not at the top: `python -m circles.tryout.devcert` imports this package
        # first, and a devcert already imported by it would run twice (runpy's RuntimeWarning).
        from circles.tryout import devcert
        paths = devcert.make(certs)
    keys = {}
    for name in ("circle", "user"):
        key_file = os.path.join(state_dir, f"{name}.key")
        if not os.path.exists(key_file):
            signing.write_key_file(key_file, signing.generate())
        keys[name] = signing.public_key(signing.read_key_file(key_file))
        paths[f"{name}_key"] = key_file
    with open(os.path.join(state_dir, "circle.pub"), "w") as f:
        f.write(keys["circle"] + "\n")
    paths["circle"] = keys["circle"]
    paths["user"] = keys["user"]
    webhooks = os.path.join(state_dir, "webhooks")
    os.makedirs(webhooks, mode=0o700, exist_ok=True)
    for provider, (handler, what, prefix) in WEBHOOK_HANDLERS.items():
        paths[f"{provider}_secret"] = _kept(os.path.join(webhooks, f"{provider}.secret"),
                                            lambda: prefix + secrets.token_hex(24) + "\n")  # noqa: B023  (called at once)
        paths[f"{provider}_script"] = _kept(os.path.join(webhooks, f"{provider}.rhai"),
                                            lambda: WEBHOOK_SCRIPT.format(handler=handler, what=what))  # noqa: B023
    paths["logs"] = os.path.join(state_dir, "logs")
    paths["run"] = os.path.join(state_dir, "run")
    os.makedirs(paths["logs"], exist_ok=True)
    return paths


def hold(state_dir: str) -> int:
    """Hold ``state_dir`` for as long as this process lives (a lock on ``try.lock``, which the
    children do not inherit): a second try-out on it stops before touching anything. Returns
    the descriptor to keep open."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "try.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise RuntimeError(f"another try-out (pid {holder or '?'}) is running on {_shown(state_dir)}; "
                           "stop it, or give this one another --state-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


def rotate_logs(logs: str) -> None:
    """Keep the previous run's logs: each ``*.log`` becomes ``*.log.1`` (replacing the one before)."""
    for name in os.listdir(logs):
        if name.endswith(".log"):
            os.replace(os.path.join(logs, name), os.path.join(logs, name + ".1"))


# -- children -------------------------------------------------------------------------------------

class Child(ProcessProtocol):
    """A twistd process whose log goes to a file and is watched for readiness lines."""

    def __init__(self, name: str, log_path: str) -> None:
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.ended = Once()  # the exit status
        self.tail: list = []
        self._partial = b""
        self._watches: list = []  # (pattern, Deferred)

    def outReceived(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.tail = (self.tail + [line])[-30:]
            for watch in list(self._watches):
                match = watch[0].search(line)
                if match:
                    self._watches.remove(watch)
                    watch[1].callback(match)

    errReceived = outReceived

    def wait_for(self, pattern: str, reactor, timeout: float = READY_TIMEOUT) -> Deferred:
        """Fire with the match of the first log line matching ``pattern`` from now on."""
        d: Deferred = Deferred()
        watch = (re.compile(pattern), d)
        self._watches.append(watch)

        def give_up():
            if not d.called:
                self._watches.remove(watch)
                d.errback(RuntimeError(f"{self.name} did not log {pattern!r} within {timeout:g}s"))

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        timer = reactor.callLater(timeout, give_up)
        self.ended.when().addCallback(lambda _: give_up())  # ended already: fails at once
        return d.addBoth(stop_timer)

    def processEnded(self, reason: Failure) -> None:
        self.log.close()
        last = "".join("\n  " + line for line in self.tail[-15:])
        for _, d in self._watches:
            d.errback(RuntimeError(f"the {self.name} exited; its last lines ({_shown(self.log_path)}):{last}"))
        self._watches = []
        self.ended.fire(reason.value.exitCode if not reason.check(ProcessDone) else 0)  # type: ignore[union-attr]

    @property
    def running(self) -> bool:
        return not self.ended.fired


def spawn(reactor, name: str, argv: list, log_path: str) -> Child:
    """Start ``argv`` in a session of its own (the terminal's Ctrl-C is ours to handle), tied to
    this process with a parent-death signal."""
    child = Child(name, log_path)
    argv = dies_with_this_process(argv, own_session=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    reactor.spawnProcess(child, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
    return child


# -- the try-out ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circles try",
        description="Run a circles server (auth, TLS, playground), its Redis and a worker on 127.0.0.1.")
    parser.add_argument("--state-dir", default="state", help="certificates, keys, logs (default ./state)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)),
                        help=f"TCP port (default $PORT or {DEFAULT_PORT}; 0 picks a free one)")
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument("--exec", metavar="CMD", help="worker engine command instead, e.g. 'rhai-run {script_file}'")
    engine.add_argument("--engine", default="circles.worker.tiny_engine:run", metavar="MODULE:CALLABLE",
                        help="worker engine callable (default circles.worker.tiny_engine:run)")
    parser.add_argument("server_args", nargs="*", metavar="-- TWISTD_ARGS",
                        help="more options for twistd circles (after --)")
    return parser


async def _run(reactor, args) -> None:
    hold(args.state_dir)  # held until this process exits
    paths = prepare(args.state_dir)
    rotate_logs(paths["logs"])
    twistd = _bin("twistd")
    circle = paths["circle"]
    logs, run_dir = paths["logs"], paths["run"]
    children: list = []
    stopping = []

    async def stop_all() -> None:
        stopping.append(True)
        if any(child.running for child in children):
            _say("circles try: stopping the worker, the server and Redis…")
        for child in reversed(children):  # the worker first, then the server (and its Redis)
            await terminate(reactor, child.transport, child.ended, STOP_TIMEOUT)

    # Stops everything when the reactor stops: Ctrl-C, SIGTERM, or a child failing below.
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(stop_all()))

    server = spawn(reactor, "server", [
        twistd, "-n", "--pidfile=", "--logfile=-", "circles", "--auth", "--playground",
        "--tls-cert", paths["cert"], "--tls-key", paths["key"], "--interface", INTERFACE,
        "--port", str(args.port), "-k", circle, "--state-dir", run_dir,
        *(f"--{provider}-{what}={paths[f'{provider}_{kind}']}" for provider in WEBHOOK_HANDLERS
          for what, kind in (("secret-file", "secret"), ("script", "script"))),
        *args.server_args,
    ], os.path.join(logs, "server.log"))
    children.append(server)
    listening = server.wait_for(r"starting on (\d+)", reactor)
    redis_up = server.wait_for("connected to Redis", reactor)
    try:
        port = int((await listening).group(1))
    except Exception:
        redis_up.addErrback(lambda _: None)  # the same failure: said once, not again as unhandled
        raise
    await redis_up
    engine = ["--exec", args.exec] if args.exec else ["--engine", args.engine]
    worker = spawn(reactor, "worker", [
        twistd, "-n", "--pidfile=", "--logfile=-", "circles-worker", "-k", circle, "--state-dir", run_dir, *engine,
    ], os.path.join(logs, "worker.log"))
    children.append(worker)
    await worker.wait_for("waiting for tasks", reactor)

    url = f"wss://localhost:{port}/{circle}"
    ca = _shown(paths["ca"])
    play = " ".join(shlex.quote(part) for part in (
        _shown(_bin("circles")), "play", url, "--ca", ca, "--key-file", _shown(paths["user_key"]), EXAMPLE_SCRIPT))
    _say(f"circles try-out is running on {INTERFACE}, port {port} (Ctrl-C stops it)")
    _say(f"  circle      {url}")
    _say(f"  playground  https://localhost:{port}/playground/?circle={circle}")
    _say(f"              (the certificate is from a development CA: trust {ca} or accept the warning)")
    _say(f"  webhooks    https://localhost:{port}/webhooks/stripe/{circle} (and .../idenfy/...)")
    _say(f"              (secrets and handlers in {_shown(os.path.dirname(paths['stripe_script']))}: docs/webhooks.md, \"On the try-out\")")
    _say(f"  logs        {_shown(logs)}/server.log, {_shown(logs)}/worker.log (the previous run's: *.log.1)")
    _say(f"  operate     {_shown(_bin('circles'))} tasks stats --state-dir {_shown(run_dir)}")
    _say("              (workers and queues; `circles tasks` and `circles members` reach this Redis with that --state-dir)")
    _say()
    _say("Paste this in another terminal:")
    _say()
    _say(f"  {play}")
    _say()

    # Runs until Ctrl-C stops the reactor; a child exiting on its own is a failure.
    exit_code, index = await DeferredList([c.ended.when() for c in children], fireOnOneCallback=True)
    if stopping:
        return
    failed = children[index]
    _say(f"circles try: the {failed.name} exited (status {exit_code}); its last lines ({_shown(failed.log_path)}):")
    for line in failed.tail[-15:]:
        _say("  " + line)
    await stop_all()
    raise SystemExit(1)


def main(argv: list | None = None) -> None:
    args = _parser().parse_args(argv)
    if not hasattr(signal, "SIGKILL") or not sys.platform.startswith("linux"):
        raise SystemExit("circles try: needs Linux (children are tied to it with PR_SET_PDEATHSIG)")

    async def run(reactor) -> None:
        try:
            await _run(reactor, args)
        except (RuntimeError, signing.KeyFileError) as e:
            _say(f"circles try: {e}")
            raise SystemExit(1) from None

    react(lambda reactor: ensureDeferred(run(reactor)))

