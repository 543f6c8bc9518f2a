"""Helpers shared by the end-to-end tests: keys, signing with eth-account, twistd processes
(the process itself, devtools.twistd.Twistd, is shared with bench/)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import coincurve
from eth_account import Account
from eth_account.messages import encode_defunct

from devtools.twistd import TWISTD, Twistd

ROOT = Path(__file__).resolve().parent.parent


class Key:
    """A secp256k1 key pair as a test client holds it."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.private = coincurve.PrivateKey(secret)
        self.pubkey = self.private.public_key.format(compressed=True).hex()
        self.uncompressed = self.private.public_key.format(compressed=False).hex()

    def eth_sign(self, text: str) -> str:
        """``personal_sign`` of ``text`` by eth-account: the form MetaMask and ethers produce."""
        return Account.from_key(self.private.secret).sign_message(encode_defunct(text=text)).signature.hex()

    def der_sign(self, text: str) -> str:
        """ECDSA over SHA-256, DER encoded, by coincurve."""
        return self.private.sign(text.encode("utf-8")).hex()


def request(ws, method: str, params: Any = None, id_: Any = 1) -> dict:
    """Send one JSON-RPC request over a websockets sync connection and return the reply."""
    message = {"jsonrpc": "2.0", "method": method, "id": id_}
    if params is not None:
        message["params"] = params
    ws.send(json.dumps(message))
    return json.loads(ws.recv(timeout=30))


def authenticate(ws, key: Key) -> dict:
    nonce = request(ws, "fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    return request(ws, "authenticate", {"pubkey": key.pubkey, "signature": key.eth_sign(nonce)})


def client_tls(ca_pem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_pem)
    return context


def source_digest(function) -> str:
    """The first 16 hex digits of the sha256 of ``function``'s source: what a test pins for
    third-party code we subclass or copy, so that a change upstream is read before it runs."""
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists and is not a zombie), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def still_open(socks: list) -> int:
    """How many of ``socks`` (plain or TLS) the server has not closed, each checked without
    blocking long; a socket that is answered (a refusal) counts as closed."""
    count = 0
    for sock in socks:
        sock.settimeout(0.01)
        try:
            if sock.recv(4096):
                continue
        except (TimeoutError, ssl.SSLWantReadError):
            count += 1
            continue
        except OSError:
            continue
    return count


def eventually_true(predicate, timeout: float = 60):
    """Poll ``predicate`` until it gives a true value or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@contextmanager
def twistd(args: list, cwd: Path, plugin: str = "circles", options: tuple = (),
           prefix: tuple = ()) -> Iterator[Twistd]:
    """``[prefix] twistd -n [options] plugin args`` (a prefix such as ``prlimit ...``), stopped
    (SIGTERM) when the block ends."""
    process = Twistd(args, cwd, plugin, options, prefix)
    try:
        yield process
    finally:
        process.stop()


def run_twistd_to_exit(args: list, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run twistd expecting it to refuse to start; return what it printed."""
    return subprocess.run([TWISTD, "-n", "--pidfile=", "circles", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
