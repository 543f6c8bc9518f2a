"""The browser playground: served only with --playground; signs in with a wallet and plays.

The browser test runs Debian's chromium through playwright-core (npm), with a test wallet
(ethers, npm) injected as ``window.ethereum``; it takes a screenshot after the play and the
page's output is checked in the DOM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .support import ROOT, Key, twistd

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CERTUTIL = shutil.which("certutil")
ARTIFACTS = ROOT / "tests" / "artifacts"


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def run_browser(page_url: str, screenshot_name: str, user: Key, env: dict = None) -> dict:
    """Drive the playground at ``page_url`` in Chromium with ``user``'s key in a test wallet;
    the report of tests/browser/playground.mjs, after checking its screenshot is a PNG."""
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / screenshot_name
    if screenshot.exists():
        screenshot.unlink()
    env = dict(os.environ, **(env or {}), WALLET_KEY="0x" + user.private.secret.hex(), CHROMIUM=CHROMIUM,
               SCRIPT='let x = 6 * 7;\nprint("hello, " + CALLER_ID);\nx', BAD_SCRIPT="1 / 0")
    result = subprocess.run(["node", str(ROOT / "tests" / "browser" / "playground.mjs"), page_url, str(screenshot)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(screenshot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_playground_is_off_by_default(tmp_path):
    circle = Key()
    with twistd(["--port", "0", "--interface", "127.0.0.1", "-k", circle.pubkey], tmp_path) as server:
        port = server.wait_listening()
        status, _, body = get(f"http://127.0.0.1:{port}/playground/")
        assert "playground.js" not in body  # the path is just another (invalid) circle


@pytest.mark.skipif(not shutil.which("node") or not os.path.exists(CHROMIUM), reason="needs node and chromium (scripts/setup --with-npm)")
def test_sign_in_with_a_wallet_and_play_in_chromium(tmp_path):
    circle, user = Key(), Key()
    args = ["--auth", "--playground", "--port", "0", "--interface", "127.0.0.1", "-k", circle.pubkey]
    with twistd(args, tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--engine", "circles.worker.tiny_engine:run"], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        base = f"http://127.0.0.1:{port}"
        status, headers, body = get(f"{base}/playground")  # redirected to /playground/
        assert status == 200 and "playground.js" in body
        assert "script-src 'self'" in headers["content-security-policy"]
        report = run_browser(f"{base}/playground/?circle={circle.pubkey}", "playground.png", user)
    assert report["url"] == f"ws://127.0.0.1:{port}/{circle.pubkey}"
    assert report["pubkey"] == user.pubkey  # recovered by the server from the wallet's signature
    assert report["output"] == f"hello, {user.pubkey}\n42\n"
    assert "-32005" in report["error"] and "division by zero" in report["error"]
    assert report["walletCalls"] == ["eth_requestAccounts", "personal_sign"]
    assert report["keyInPage"] is False
    assert not [line for line in report["console"] if line.startswith(("error", "pageerror"))], report["console"]
    assert "Traceback" not in server.output + worker.output


def trusting_home(directory: Path, ca_pem: str) -> str:
    """A HOME whose NSS database (what Chromium on Linux trusts besides its root store) trusts
    ``ca_pem``, as a developer who imported the try-out's CA has; no certificate error is
    ignored, so the TLS handshake and the chain are checked as for any site."""
    nssdb = directory / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([CERTUTIL, "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True, timeout=60)
    subprocess.run([CERTUTIL, "-A", "-d", f"sql:{nssdb}", "-t", "C,,", "-n", "circles development CA",
                    "-i", ca_pem], check=True, timeout=60)
    return str(directory)


@pytest.mark.skipif(not shutil.which("node") or not os.path.exists(CHROMIUM) or CERTUTIL is None,
                    reason="needs node, chromium and certutil (scripts/setup --with-npm)")
def test_try_out_playground_over_wss_with_the_development_ca_trusted(tmp_path):
    """The main demo as a user meets it: ./scripts/try, then its playground URL in a browser
    that trusts state/certs/ca.pem (Chromium offers ALPN h2 and http/1.1), and curl."""
    state, user = tmp_path / "state", Key()
    proc = subprocess.Popen([str(ROOT / "scripts" / "try"), "--state-dir", str(state), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, CIRCLES_SKIP_SETUP="1"))
    lines: list = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any(" play " in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        page = re.search(r"(https://localhost:(\d+)/playground/\?circle=(\w+))", "".join(lines))
        page_url, port, circle = page.group(1), page.group(2), page.group(3)
        ca = str(state / "certs" / "ca.pem")
        curl = subprocess.run(["curl", "-sS", "--cacert", ca, f"https://localhost:{port}/health"],
                              capture_output=True, text=True, timeout=60)
        assert curl.returncode == 0 and json.loads(curl.stdout) == {"status": "ok"}, curl.stderr
        home = trusting_home(tmp_path / "home", ca)
        report = run_browser(page_url, "playground-wss.png", user, env={"HOME": home})
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert report["url"] == f"wss://localhost:{port}/{circle}"
    assert report["pubkey"] == user.pubkey
    assert report["output"] == f"hello, {user.pubkey}\n42\n"
    assert "-32005" in report["error"] and "division by zero" in report["error"]
    assert not [line for line in report["console"] if line.startswith(("error", "pageerror"))], report["console"]
    assert "Traceback" not in (state / "logs" / "server.log").read_text()
