"""The browser playground: served only with --playground; signs in with a wallet and plays.

The browser test runs Debian's chromium through playwright-core (npm), with a test wallet
(ethers, npm) injected as ``window.ethereum``; it takes a screenshot after the play and the
page's output is checked in the DOM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from .support import ROOT, Key, twistd

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


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
            twistd(["-k", circle.pubkey, "--engine", "circles.tiny_engine:run"], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        base = f"http://127.0.0.1:{port}"
        status, headers, body = get(f"{base}/playground")  # redirected to /playground/
        assert status == 200 and "playground.js" in body
        assert "script-src 'self'" in headers["content-security-policy"]
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "playground.png"
        if screenshot.exists():
            screenshot.unlink()
        env = dict(os.environ, WALLET_KEY="0x" + user.private.secret.hex(), CHROMIUM=CHROMIUM,
                   SCRIPT='let x = 6 * 7;\nprint("hello, " + CALLER_ID);\nx', BAD_SCRIPT="1 / 0")
        result = subprocess.run(["node", str(ROOT / "tests" / "browser" / "playground.mjs"),
                                 f"{base}/playground/?circle={circle.pubkey}", str(screenshot)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["url"] == f"ws://127.0.0.1:{port}/{circle.pubkey}"
    assert report["pubkey"] == user.pubkey  # recovered by the server from the wallet's signature
    assert report["output"] == f"hello, {user.pubkey}\n42\n"
    assert "-32005" in report["error"] and "division by zero" in report["error"]
    assert report["walletCalls"] == ["eth_requestAccounts", "personal_sign"]
    assert report["keyInPage"] is False
    assert not [line for line in report["console"] if line.startswith(("error", "pageerror"))], report["console"]
    with open(screenshot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in server.output + worker.output
