"""The ``circles`` twistd plugin as a user runs it: a real process, real TLS, a real client.

The client is the ``websockets`` library (not ours); signatures come from eth-account and
coincurve. Each test starts ``twistd -n circles`` on a free port and reads the port from its log.
"""

import json
import socket
import ssl
import subprocess

import pytest
import websockets
from websockets.sync.client import connect

from devtools.twistd import TWISTD

from ..support import ROOT, Key, authenticate, client_tls, request, run_twistd_to_exit, twistd


@pytest.fixture
def keys():
    return Key(), Key(), Key()


def test_plugin_is_listed_by_twistd(tmp_path):
    result = subprocess.run([TWISTD, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "circles" in result.stdout
    result = subprocess.run([TWISTD, "circles", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    for option in ("--auth", "--tls-cert", "--tls-key", "--circle", "--listen", "--port", "--interface",
                   "--nonce-ttl", "--max-message-size"):
        assert option in result.stdout


# A worker engine any machine has: the script is shell, its stdout the output.
SHELL_WORKER = ["--exec", "sh {script_file}"]


def test_authenticated_session_over_wss(tmp_path, tls_files, keys):
    circle1, circle2, user = keys
    args = ["--auth", "--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"],
            "-k", circle1.pubkey, "-k", circle2.uncompressed, "--port", "0", "--interface", "127.0.0.1"]
    with twistd(args, tmp_path) as server, \
            twistd(["-k", circle1.pubkey, *SHELL_WORKER], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        with connect(f"wss://localhost:{port}/{circle1.pubkey}", ssl=client_tls(tls_files["ca"])) as ws:
            assert request(ws, "whoami")["result"] == {"circle": circle1.pubkey, "authenticated": False, "pubkey": None}
            # --auth: play is refused until the session authenticates
            assert request(ws, "play", {"script": "echo hi"})["error"]["code"] == -32001
            reply = request(ws, "fetch_nonce", {"pubkey": user.pubkey})
            nonce = reply["result"]["nonce"]
            assert len(nonce) >= 32 and reply["result"]["expires_at"] > 0
            reply = request(ws, "authenticate", {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)})
            assert reply["result"] == {"authenticated": True, "pubkey": user.pubkey}
            assert request(ws, "whoami")["result"] == {"circle": circle1.pubkey, "authenticated": True, "pubkey": user.pubkey}
            # play runs on the worker, which sees the circle and the caller
            reply = request(ws, "play", {"script": 'printf "%s %s" "$CONTEXT_ID" "$CALLER_ID"'})
            assert reply["result"] == {"output": f"{circle1.pubkey} {user.pubkey}"}
            # The document served is exactly the one in the repository.
            with open(ROOT / "openrpc.json") as f:
                assert request(ws, "rpc.discover")["result"] == json.load(f)
        # The second circle was given uncompressed; it is served under its compressed id.
        with connect(f"wss://localhost:{port}/{circle2.pubkey}", ssl=client_tls(tls_files["ca"])) as ws:
            reply = request(ws, "fetch_nonce", {"pubkey": user.uncompressed})
            nonce = reply["result"]["nonce"]
            reply = request(ws, "authenticate", {"pubkey": user.uncompressed, "signature": user.der_sign(nonce)})
            assert reply["result"] == {"authenticated": True, "pubkey": user.pubkey}
            # no worker serves circle2: the play is refused at once and says so
            assert request(ws, "play", {"script": "echo hi", "timeout": 0.5})["error"]["code"] == -32008
        # Any other circle is refused during the opening handshake.
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            connect(f"wss://localhost:{port}/{user.pubkey}", ssl=client_tls(tls_files["ca"]))
        assert refused.value.response.status_code == 404
    assert "Traceback" not in server.output + worker.output


def _tls_handshake(port: int, ca: str, version, ciphers: str = "DEFAULT:@SECLEVEL=0") -> str:
    """Handshake with only ``version`` (and ``ciphers``) offered; return the version agreed."""
    context = client_tls(ca)
    context.set_ciphers(ciphers)  # level 0 lets the client offer what the server must refuse
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls_socket:
            return tls_socket.version()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_2_is_the_floor_and_weak_ciphers_are_refused(tmp_path, tls_files, keys):
    circle = keys[0]
    args = ["--tls-cert", tls_files["combined"], "-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"]
    with twistd(args, tmp_path) as server:
        port = server.wait_listening()
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):  # the server's alert
                _tls_handshake(port, tls_files["ca"], old)
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            _tls_handshake(port, tls_files["ca"], ssl.TLSVersion.TLSv1_2, "NULL:eNULL:@SECLEVEL=0")
        assert _tls_handshake(port, tls_files["ca"], ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert _tls_handshake(port, tls_files["ca"], ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        # The key living in the certificate file (--tls-cert alone) serves wss.
        with connect(f"wss://localhost:{port}/{circle.pubkey}", ssl=client_tls(tls_files["ca"])) as ws:
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey


def test_without_circles_any_valid_circle_is_served_with_a_warning(tmp_path, keys):
    circle = keys[0]
    with twistd(["--port", "0", "--interface", "127.0.0.1"], tmp_path) as server:
        port = server.wait_listening()
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey
            # Without --auth, play is open to anonymous sessions: it is not refused with -32001
            # but, with no live worker for this circle, with -32008 at once.
            server.wait_for("connected to Redis")
            assert request(ws, "play", ["echo hi", 0.5])["error"]["code"] == -32008
        for path in ("not-a-key", "02" + "00" * 32, circle.pubkey + "/extra"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                connect(f"ws://127.0.0.1:{port}/{path}")
            assert refused.value.response.status_code == 404
    assert server.output.count("no circles configured") == 1


def test_listen_endpoint_strings(tmp_path, keys):
    circle = keys[0]
    with twistd(["--listen", "tcp:0:interface=127.0.0.1", "-k", circle.pubkey], tmp_path) as server:
        port = server.wait_listening()
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "missing.pem"], "cannot read TLS certificate 'missing.pem'"),
    (["--tls-cert", "{cert}", "--tls-key", "missing.pem"], "cannot read TLS key 'missing.pem'"),
    (["--tls-cert", "{key}"], "no PEM certificate"),
    (["--tls-cert", "{cert}"], "no unencrypted PEM private key"),
    (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "the private key does not match the certificate"),
    (["-k", "02abcd"], "invalid circle '02abcd'"),
    (["-k", "02" + "00" * 32], "not a point on secp256k1"),
    (["--listen", "nonsense:1"], "is not a valid endpoint"),
    (["--tls-key", "{key}"], "--tls-key needs --tls-cert"),
    (["--redis-url", "rediss://localhost:6380/0?ssl_ca_certs=missing.pem"], "cannot read CA file 'missing.pem'"),
    (["--redis-url", "rediss://localhost:6380/0?ssl_ca_certs={key}"], "no PEM certificate in"),
])
def test_bad_start_up_is_one_clear_line(tmp_path, tls_files, args, message):
    import trustme
    other = trustme.CA().issue_cert("localhost")
    other.private_key_pem.write_to_path(str(tmp_path / "other_key.pem"))
    args = [a.format(cert=tls_files["cert"], key=tls_files["key"], other_key=tmp_path / "other_key.pem") for a in args]
    result = run_twistd_to_exit(args, tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_port_in_use_fails_start_up(tmp_path, keys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd_to_exit(["--port", str(port), "--interface", "127.0.0.1"], tmp_path)
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr


def test_abusive_client_does_not_disturb_others(tmp_path, keys):
    circle, user = keys[0], keys[1]
    with twistd(["--port", "0", "--interface", "127.0.0.1", "--max-message-size", "65536"], tmp_path) as server:
        port = server.wait_listening()
        url = f"ws://127.0.0.1:{port}/{circle.pubkey}"
        with connect(url) as bystander:
            with connect(url, max_size=None) as abuser:
                abuser.send("[" * 60000)
                reply = json.loads(abuser.recv(timeout=30))
                assert reply["error"]["code"] == -32700 and reply["id"] is None
                abuser.send("x" * 70000)  # over --max-message-size: closed with 1009
                with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                    abuser.recv(timeout=30)
                assert closed.value.rcvd.code == 1009
            with connect(url) as binary:
                binary.send(b"\x00\x01")
                with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                    binary.recv(timeout=30)
                assert closed.value.rcvd.code == 1003
            assert authenticate(bystander, user)["result"]["pubkey"] == user.pubkey
    assert "Traceback" not in server.output


def test_development_certificate_serves_wss(tmp_path, keys):
    """certs/README.md's recipe: ``python -m circles.tryout.devcert DIR``, then a verifying client."""
    import os
    import sys
    made = subprocess.run([sys.executable, "-m", "circles.tryout.devcert", str(tmp_path / "certs")],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert os.stat(tmp_path / "certs" / "key.pem").st_mode & 0o777 == 0o600
    circle = keys[0]
    args = ["--tls-cert", "certs/cert.pem", "--tls-key", "certs/key.pem", "-k", circle.pubkey,
            "--port", "0", "--interface", "127.0.0.1"]
    with twistd(args, tmp_path) as server:
        port = server.wait_listening()
        for host in ("localhost", "127.0.0.1"):
            context = client_tls(str(tmp_path / "certs" / "ca.pem"))
            with connect(f"wss://{host}:{port}/{circle.pubkey}", ssl=context) as ws:
                assert request(ws, "whoami")["result"]["circle"] == circle.pubkey
        # A client that does not trust the development CA refuses the server.
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(f"wss://localhost:{port}/{circle.pubkey}", ssl=ssl.create_default_context())
