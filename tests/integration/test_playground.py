"""The browser playground: served only with --playground; signs in with a wallet, or without one
with a development key, and plays; its errors are in words.

The browser tests run Debian's chromium through playwright-core (npm), with a test wallet
(ethers, npm) injected as ``window.ethereum``, or with none; they take screenshots and check the
page's output, status and errors in the DOM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..support import ROOT, Key, twistd

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CERTUTIL = shutil.which("certutil")
ARTIFACTS = ROOT / "tests" / "artifacts"


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def run_browser(page_url: str, screenshot_name: str, user: Key = None, env: dict = None,
                driver: str = "playground.mjs") -> dict:
    """Drive the playground at ``page_url`` in Chromium with tests/browser/``driver``
    (playground.mjs: ``user``'s key in a test wallet; devkey.mjs: no wallet); its report, after
    checking its screenshot is a PNG."""
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / screenshot_name
    if screenshot.exists():
        screenshot.unlink()
    env = dict(os.environ, **(env or {}), CHROMIUM=CHROMIUM,
               SCRIPT='let x = 6 * 7;\nprint("hello, " + CALLER_ID);\nx', BAD_SCRIPT="1 / 0")
    if user is not None:
        env["WALLET_KEY"] = "0x" + user.private.secret.hex()
    result = subprocess.run(["node", str(ROOT / "tests" / "browser" / driver), page_url, str(screenshot)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(screenshot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextmanager
def playing(tmp_path, circle: Key):
    """A server with --auth and the playground, and a worker with the tiny engine, both ready:
    (server, worker, port)."""
    args = ["--auth", "--playground", "--port", "0", "--interface", "127.0.0.1", "-k", circle.pubkey]
    with twistd(args, tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--engine", "circles.worker.tiny_engine:run"], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        yield server, worker, port


def test_playground_is_off_by_default(tmp_path):
    circle = Key()
    with twistd(["--port", "0", "--interface", "127.0.0.1", "-k", circle.pubkey], tmp_path) as server:
        port = server.wait_listening()
        status, _, body = get(f"http://127.0.0.1:{port}/playground/")
        assert "playground.js" not in body  # the path is just another (invalid) circle


@pytest.mark.parametrize("auth_required, mode", [(True, b"required"), (False, b"open")])
def test_the_page_says_whether_plays_need_a_sign_in(auth_required, mode):
    """The page learns from the server that serves it whether --auth is on (Play waits
    for a sign-in then: the browser tests below)."""
    from twisted.web.test.requesthelper import DummyRequest

    from circles.server.http.playground import Playground
    for name in (b"", b"index.html"):
        page = Playground(auth_required).getChild(name, None).render(DummyRequest([name]))
        assert page.count(b"<body") == 1 and b'<body data-auth="' + mode + b'">' in page


@pytest.mark.skipif(not shutil.which("node") or not os.path.exists(CHROMIUM), reason="needs node and chromium (scripts/setup --with-npm)")
def test_sign_in_with_a_wallet_and_play_in_chromium(tmp_path):
    circle, user = Key(), Key()
    with playing(tmp_path, circle) as (server, worker, port):
        base = f"http://127.0.0.1:{port}"
        status, headers, body = get(f"{base}/playground")  # redirected to /playground/
        assert status == 200 and "playground.js" in body
        assert "script-src 'self'" in headers["content-security-policy"]
        report = run_browser(f"{base}/playground/?circle={circle.pubkey}", "playground.png", user)
    assert report["url"] == f"ws://127.0.0.1:{port}/{circle.pubkey}"
    assert report["pubkey"] == user.pubkey  # recovered by the server from the wallet's signature
    assert report["output"] == f"hello, {user.pubkey}\n42"
    assert "-32005" in report["error"] and "division by zero" in report["error"]
    assert report["errorMessage"] == "The script failed." and report["status"] == "failed"
    assert report["walletDefault"] is True
    assert report["walletCalls"] == ["eth_requestAccounts", "personal_sign"]
    assert report["keyInPage"] is False
    assert not [line for line in report["console"] if line.startswith(("error", "pageerror"))], report["console"]
    assert "Traceback" not in server.output + worker.output


@pytest.mark.skipif(not shutil.which("node") or not os.path.exists(CHROMIUM), reason="needs node and chromium (scripts/setup --with-npm)")
def test_without_a_wallet_a_development_key_signs_in_and_errors_are_in_words(tmp_path):
    """With --auth and no browser wallet: the page offers a development key (made in the page by
    the vendored @noble/curves, kept in localStorage), the server checks its ECDSA signature, the
    script plays as that key; the key survives a reload and is forgotten on request. Errors are
    said in words (sign in first, the script failed, cannot connect), the status says "failed",
    and a later success clears them."""
    circle, elsewhere = Key(), Key()
    with playing(tmp_path, circle) as (server, worker, port):
        base = f"http://127.0.0.1:{port}"
        status, headers, body = get(f"{base}/playground/noble-secp256k1.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        assert headers["content-security-policy"].count("script-src 'self';") == 1
        assert body.startswith("// @noble/curves 2.4.0 and @noble/hashes 2.4.0 (npm)")
        assert "MIT" in get(f"{base}/playground/noble-secp256k1.LICENSE")[2]
        report = run_browser(f"{base}/playground/?circle={circle.pubkey}", "playground-devkey.png", driver="devkey.mjs",
                             env={"UNKNOWN_CIRCLE_URL": f"ws://127.0.0.1:{port}/{elsewhere.pubkey}"})

    # No wallet: its button is gone, the page says so, the development key is labelled as such.
    assert report["walletButtonShown"] is False and report["noWalletShown"] is True
    assert "throw-away, for local development only" in report["devkeyNotice"]
    assert report["storedBefore"] is None  # no key is made until asked for

    # Before signing in (--auth), Play waits for it, and the page says why (Play was
    # enabled and answered -32001).
    before = report["beforeSignIn"]
    sign_in_first = "Sign in first: this server plays scripts for signed-in users only."
    assert before["playDisabled"] is True and before["playTitle"] == sign_in_first
    assert before["identity"] == f"not signed in. {sign_in_first}" and not before["errorShown"]

    # Signed in with the key the page made and stored; the server checked its signature.
    dev = Key(bytes.fromhex(report["storedKey"]))
    signed_in = report["signIn"]
    assert signed_in["pubkey"] == dev.pubkey == report["devkeyStatusPubkey"]
    assert signed_in["identity"] == f"signed in as {dev.pubkey} (development key)"
    assert signed_in["status"] == "signed in" and not signed_in["errorShown"]
    assert signed_in["playDisabled"] is False and signed_in["playTitle"] == ""
    assert report["played"]["output"] == f"hello, {dev.pubkey}\n42" and report["played"]["status"] == "played"
    assert report["keyInPage"] is False  # only its public key is shown

    failed = report["failed"]
    assert failed["status"] == "failed" and failed["errorMessage"] == "The script failed."
    assert "-32005" in failed["errorDetail"] and "division by zero" in failed["errorDetail"]
    again = report["playedAgain"]
    assert again["status"] == "played" and not again["errorShown"] and again["errorMessage"] == ""
    assert again["output"] == f"hello, {dev.pubkey}\n42"

    # The same key after a reload; forgotten on request, which signs out; a new one after.
    assert report["afterReload"]["pubkey"] == dev.pubkey
    assert report["storedAfterForget"] is None and report["forgetDisabled"] is True
    assert report["forgotten"]["identity"] == f"not signed in. {sign_in_first}"
    assert report["forgotten"]["status"] == "development key forgotten, signed out"
    assert report["afterForget"]["playDisabled"] is True  # signed out: Play waits for a sign-in again
    assert report["newKey"]["pubkey"] and report["newKey"]["pubkey"] != dev.pubkey

    described = {int(code): words for code, words in report["described"].items()}
    assert described[-32001]["message"].startswith("Sign in first")
    assert described[-32002]["message"].startswith("Sign-in failed")
    assert described[-32003]["message"] == "The script took too long and was stopped."
    assert described[-32004]["message"].startswith("No worker can run scripts right now")
    assert described[-32005]["message"] == "The script failed." and "worker says" in described[-32005]["detail"]
    assert described[-32006]["message"].startswith("Too many requests")
    assert described[-32007]["message"] == "The result is too large to send back (2000000 bytes; the limit is 1048576)."
    assert described[-32603]["message"].startswith("The server had an internal error")
    assert described[-32602]["message"].startswith("The server did not understand the request")
    for code, words in described.items():
        assert f"error {code}: technical message" in words["detail"]
        assert str(code) not in words["message"] and "technical message" not in words["message"]

    # A circle the server does not serve is refused at the handshake: said as a connection failure.
    unknown = report["unknownCircle"]
    assert unknown["errorMessage"].startswith(f"Cannot connect to ws://127.0.0.1:{port}/{elsewhere.pubkey}.")
    assert unknown["status"] == "failed" and "code 1006" in unknown["errorDetail"]
    assert report["afterUnknownCircle"]["playDisabled"] is True
    assert report["badUrl"]["errorMessage"].startswith("That is not a circle URL")
    assert report["badUrl"]["status"] == "sign-in failed"
    # Chromium logs the refused WebSocket itself; nothing else may be an error.
    errors = [line for line in report["console"] if line.startswith(("error", "pageerror"))]
    assert all("WebSocket connection to" in line for line in errors), errors
    assert "Traceback" not in server.output + worker.output


def test_the_vendored_signer_is_what_scripts_vendor_noble_makes(tmp_path):
    """noble-secp256k1.js and its LICENSE are rebuilt by scripts/vendor-noble from the npm
    packages pinned in package-lock.json, byte for byte."""
    if not (ROOT / "node_modules" / ".bin" / "esbuild").exists() or not (ROOT / "node_modules" / "@noble" / "curves").exists():
        pytest.skip("needs the npm packages (npm ci)")
    playground = ROOT / "circles" / "server" / "http" / "playground"
    committed = {name: (playground / name).read_bytes() for name in ("noble-secp256k1.js", "noble-secp256k1.LICENSE")}
    try:
        subprocess.run([str(ROOT / "scripts" / "vendor-noble")], check=True, timeout=120, capture_output=True)
        for name, content in committed.items():
            assert (playground / name).read_bytes() == content, f"{name} differs from what scripts/vendor-noble makes"
    finally:
        for name, content in committed.items():
            (playground / name).write_bytes(content)
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@noble/curves"]["version"] == "2.4.0"


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
    that trusts state/certs/ca.pem (Chromium offers ALPN h2 and http/1.1), and curl; signed in
    with a wallet, and without one with a development key (the try-out has --auth)."""
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
        no_wallet = run_browser(page_url, "playground-wss-devkey.png", driver="devkey.mjs",
                                env={"HOME": home, "UNKNOWN_CIRCLE_URL": f"wss://localhost:{port}/{Key().pubkey}"})
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert report["url"] == f"wss://localhost:{port}/{circle}"
    assert report["pubkey"] == user.pubkey
    assert report["output"] == f"hello, {user.pubkey}\n42"
    assert "-32005" in report["error"] and "division by zero" in report["error"]
    assert not [line for line in report["console"] if line.startswith(("error", "pageerror"))], report["console"]
    dev = Key(bytes.fromhex(no_wallet["storedKey"]))
    assert no_wallet["beforeSignIn"]["playDisabled"] is True  # the try-out has --auth
    assert no_wallet["signIn"]["pubkey"] == dev.pubkey and no_wallet["afterReload"]["pubkey"] == dev.pubkey
    assert no_wallet["played"]["output"] == f"hello, {dev.pubkey}\n42"
    assert no_wallet["failed"]["status"] == "failed" and not no_wallet["playedAgain"]["errorShown"]
    assert no_wallet["unknownCircle"]["errorMessage"].startswith(f"Cannot connect to wss://localhost:{port}/")
    assert "Traceback" not in (state / "logs" / "server.log").read_text()


def test_the_package_ships_every_file_of_the_page(tmp_path):
    """The wheel pip builds from a fresh checkout holds every file of
    circles/server/http/playground/: the page, its script and style, the vendored signer, its licenses."""
    checkout, build = tmp_path / "checkout", tmp_path / "build"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # not one deleted in the work tree
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    # As pip builds it: in an isolated environment with the setuptools pyproject.toml asks for.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(build), str(checkout)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    source = ROOT / "circles" / "server" / "http" / "playground"
    page = {p.name for p in source.iterdir() if p.is_file() and not p.name.endswith(".pyc")}
    assert {"index.html", "playground.js", "playground.css", "noble-secp256k1.js", "noble-secp256k1.LICENSE"} <= page
    (wheel,) = build.glob("*.whl")
    prefix = "circles/server/http/playground/"
    shipped = {n[len(prefix):] for n in zipfile.ZipFile(wheel).namelist() if n.startswith(prefix) and "/" not in n[len(prefix):]}
    assert page <= shipped, page - shipped
