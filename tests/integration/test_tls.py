"""TLS as its real clients meet it: curl, Node's https, the ``openssl`` command, Python's ssl.

Browsers, curl and most HTTP libraries offer ALPN (``h2``, ``http/1.1``); Python's ssl and
Autobahn's client do not, which is how a server that refused every ALPN client passed its
other tests. The cipher probes use an RSA certificate, since static RSA key exchange (the
thing to refuse) needs one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from contextlib import nullcontext

import pytest
import trustme

from ..support import Key, client_tls, run_twistd_to_exit, twistd

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
NODE = shutil.which("node")


@pytest.fixture(scope="module")
def rsa_files(tmp_path_factory):
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    directory = tmp_path_factory.mktemp("rsa")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "combined.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(directory / "cert.pem"), append=i > 0)
    return {name: str(directory / f"{name}.pem") for name in ("ca", "combined", "key", "cert")}


CIRCLE = Key()


@pytest.fixture(scope="module")
def server(tmp_path_factory, rsa_files):
    """``--tls-cert`` with an RSA certificate and the default policy; a short request deadline."""
    cwd = tmp_path_factory.mktemp("server")
    args = ["--tls-cert", rsa_files["combined"], "--port", "0", "--interface", "127.0.0.1",
            "--handshake-timeout", "1", "-k", CIRCLE.pubkey]
    with twistd(args, cwd) as process:
        process.wait_listening()
        yield process


def s_client(port: int, *options: str) -> str:
    """What ``openssl s_client`` says of one handshake with the server (stdin closed at once)."""
    result = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                             *options], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    return result.stdout + result.stderr


def negotiated(report: str) -> str:
    """The cipher a handshake agreed on, or "(NONE)"."""
    for line in report.splitlines():
        if ", Cipher is " in line:
            return line.rsplit(" ", 1)[-1]
    return "(NONE)"


needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is part of Debian's base system")


# -- ALPN ---------------------------------------------------------------------------------------

def test_curl_with_its_default_alpn_reaches_health(server, rsa_files):
    result = subprocess.run([CURL, "-sS", "--cacert", rsa_files["ca"], "-w", "\n%{http_code} %{http_version}",
                             f"https://localhost:{server.port}/health"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    body, status = result.stdout.rsplit("\n", 1)
    assert json.loads(body) == {"status": "ok"}
    assert status == "200 1.1"


def test_curl_without_alpn_still_works(server, rsa_files):
    result = subprocess.run([CURL, "-sS", "--no-alpn", "--cacert", rsa_files["ca"],
                             f"https://localhost:{server.port}/health"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and json.loads(result.stdout) == {"status": "ok"}, result.stderr


@pytest.mark.skipif(NODE is None, reason="needs node (scripts/setup)")
def test_node_https_and_tls_offering_h2_and_http1(server, rsa_files):
    script = r"""
const https = require('node:https'), tls = require('node:tls'), fs = require('node:fs');
const [port, caFile] = process.argv.slice(1), ca = fs.readFileSync(caFile);
const sock = tls.connect({host: '127.0.0.1', port: +port, servername: 'localhost', ca, ALPNProtocols: ['h2', 'http/1.1']}, () => {
  const alpn = sock.alpnProtocol; sock.end();
  https.get({host: '127.0.0.1', port: +port, servername: 'localhost', path: '/health', ca,
             ALPNProtocols: ['h2', 'http/1.1']}, (res) => {
    const version = res.socket.alpnProtocol;
    let body = ''; res.on('data', (d) => body += d);
    res.on('end', () => console.log(JSON.stringify({alpn, status: res.statusCode, body, version})));
  }).on('error', (e) => { console.log(JSON.stringify({error: e.message})); });
});
sock.on('error', (e) => console.log(JSON.stringify({error: e.message})));
"""
    result = subprocess.run([NODE, "-e", script, str(server.port), rsa_files["ca"]], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"alpn": "http/1.1", "status": 200, "body": '{"status":"ok"}', "version": "http/1.1"}, report


@needs_openssl
def test_alpn_picks_http1_refuses_h2_alone_and_is_optional(server):
    assert "ALPN protocol: http/1.1" in s_client(server.port, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: http/1.1" in s_client(server.port, "-alpn", "http/1.1")
    # RFC 7301 3.2: no protocol in common is the no_application_protocol alert (120).
    assert "alert no application protocol" in s_client(server.port, "-alpn", "h2")
    plain = s_client(server.port)
    assert "No ALPN negotiated" in plain and negotiated(plain) != "(NONE)"


def test_python_wss_client_without_alpn_still_connects(server, rsa_files):
    from websockets.sync.client import connect
    with connect(f"wss://localhost:{server.port}/{CIRCLE.pubkey}", ssl=client_tls(rsa_files["ca"])) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "whoami", "id": 1}))
        assert json.loads(ws.recv(timeout=30))["result"]["circle"] == CIRCLE.pubkey


def test_a_wss_connection_carries_on_as_its_tls_buffers_are_let_go(server, rsa_files):
    """A second after it opens, and after every read or write over 2 KiB, a TLS connection's
    memory BIOs are replaced by empty ones (circles.server.tls.release_buffers): large messages
    both ways, small ones, with the swaps in between, all arrive whole and in order."""
    from websockets.sync.client import connect
    padding = "p" * 100_000
    with connect(f"wss://localhost:{server.port}/{CIRCLE.pubkey}", ssl=client_tls(rsa_files["ca"]),
                 max_size=2 ** 21) as ws:
        for round_ in range(3):
            time.sleep(1.5)  # past the second after which the buffers go
            ws.send(json.dumps({"jsonrpc": "2.0", "method": "whoami", "id": round_, "padding": padding}))
            assert json.loads(ws.recv(timeout=30))["result"]["circle"] == CIRCLE.pubkey  # a 100 kB read
            ws.send(json.dumps({"jsonrpc": "2.0", "method": "rpc.discover", "id": 10 + round_}))
            reply = json.loads(ws.recv(timeout=30))
            assert reply["id"] == 10 + round_ and reply["result"]["openrpc"]  # a 10 kB write
            time.sleep(1.5)
            ws.send(json.dumps({"jsonrpc": "2.0", "method": "whoami", "id": 20 + round_}))
            assert json.loads(ws.recv(timeout=30))["id"] == 20 + round_


def frame(text: bytes) -> bytes:
    """A client's text frame (masked with the zero key) of under 126 bytes."""
    return bytes([0x81, 0x80 | len(text)]) + b"\0\0\0\0" + text


def application_records(raw: bytes) -> int:
    """How many TLS records of application data (type 23) ``raw``, whole records, holds."""
    count, at = 0, 0
    while at + 5 <= len(raw):
        count += raw[at] == 23
        at += 5 + int.from_bytes(raw[at + 3:at + 5], "big")
    assert at == len(raw), "not whole records"
    return count


def upgraded(port: int, context: ssl.SSLContext, timeout: float = 30):
    """A RawTLSClient with its WebSocket open on the circle."""
    from ..support import RawTLSClient

    client = RawTLSClient(port, context, timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    client.send(f"GET /{CIRCLE.pubkey} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert client.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 101")
    return client


@pytest.mark.parametrize("processes", [1, 2])
def test_the_replies_of_one_turn_go_out_in_one_record(server, rsa_files, tmp_path, processes):
    """Two requests in one record are answered in one turn of the reactor, and their two reply
    frames go out in one TLS record, written at the turn's end (circles.server.tls.tls_factory):
    not a record a frame. Under ``--processes`` too, whose TLS wraps the shared port's factory."""
    args = ["--tls-cert", rsa_files["combined"], "--port", "0", "--interface", "127.0.0.1", "--processes", "2",
            "-k", CIRCLE.pubkey]
    with (twistd(args, tmp_path) if processes == 2 else nullcontext(server)) as process:
        port = process.wait_listening() if processes == 2 else server.port
        client = upgraded(port, ssl.create_default_context(cafile=rsa_files["ca"]))
        client.send(frame(b'{"jsonrpc":"2.0","method":"whoami","id":1}') +
                    frame(b'{"jsonrpc":"2.0","method":"whoami","id":2}'))
        raw, text = b"", b""
        while b'"id":2' not in text:
            chunk = client.sock.recv(65536)
            assert chunk, f"closed after {text!r}"
            raw += chunk
            client.incoming.write(chunk)
            try:
                while piece := client.tls.read(65536):
                    text += piece
            except ssl.SSLWantReadError:
                pass
        assert b'"id":1' in text
        assert application_records(raw) == 1, raw
        client.sock.close()


def test_what_a_timer_writes_reaches_an_idle_wss_client(rsa_files, tmp_path):
    """A ping is written by a timer, outside every event, and held for the end of the turn like
    every other write: it reaches a client that sends nothing. (That it goes before the reactor
    waits again, rather than with its next wake-up, is tests/unit/test_event_loop.py's.)"""
    args = ["--tls-cert", rsa_files["combined"], "--port", "0", "--interface", "127.0.0.1", "-k", CIRCLE.pubkey,
            "--ping-interval", "1", "--ping-timeout", "30"]
    with twistd(args, tmp_path) as process:
        client = upgraded(process.wait_listening(), ssl.create_default_context(cafile=rsa_files["ca"]), timeout=10)
        assert client.read_until(b"\x89") == b"\x89"  # a ping frame, first of all (else the read times out)
        client.sock.close()


# -- the cipher policy ------------------------------------------------------------------------

REFUSED_TLS12 = [
    "AES128-SHA",                   # static RSA, CBC, SHA-1
    "AES256-GCM-SHA384",            # static RSA (no forward secrecy), even with GCM
    "AES128-SHA256",                # static RSA, CBC
    "ECDHE-RSA-AES128-SHA",         # forward secret, but CBC with SHA-1
    "ECDHE-RSA-AES256-SHA384",      # CBC
    "DHE-RSA-AES128-GCM-SHA256",    # no DH parameters shipped
    "DES-CBC3-SHA",                 # 3DES
    "NULL-SHA256",                  # no encryption
]
ACCEPTED_TLS12 = ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"]
TLS13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


@needs_openssl
@pytest.mark.parametrize("cipher", REFUSED_TLS12)
def test_weak_tls12_ciphers_are_refused(server, cipher):
    # @SECLEVEL=0 lets this client offer what OpenSSL 3 would not offer by default.
    assert negotiated(s_client(server.port, "-tls1_2", "-cipher", f"{cipher}:@SECLEVEL=0")) == "(NONE)"


@needs_openssl
@pytest.mark.parametrize("cipher", ACCEPTED_TLS12)
def test_forward_secret_aead_tls12_ciphers_are_accepted(server, cipher):
    assert negotiated(s_client(server.port, "-tls1_2", "-cipher", cipher)) == cipher


@needs_openssl
@pytest.mark.parametrize("suite", TLS13)
def test_tls13_suites_are_accepted(server, suite):
    report = s_client(server.port, "-tls1_3", "-ciphersuites", suite)
    assert negotiated(report) == suite and "TLSv1.3" in report


@needs_openssl
def test_a_client_asking_to_renegotiate_is_refused(server):
    """Each renegotiation would be a whole handshake (the server signs again) on one connection,
    as often as the client asks: OpenSSL 3 refuses a client's by default, and this holds it so."""
    result = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", "-servername", "localhost",
                             "-tls1_2"], input="R\n", capture_output=True, text=True, timeout=30)
    report = result.stdout + result.stderr
    assert negotiated(report) != "(NONE)" and "RENEGOTIATING" in report
    assert "no renegotiation" in report


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(server, rsa_files, version):
    context = client_tls(rsa_files["ca"])
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="localhost")


@needs_openssl
def test_tls_ciphers_option_sets_the_tls12_list(tmp_path, rsa_files):
    args = ["--tls-cert", rsa_files["cert"], "--tls-key", rsa_files["key"], "--port", "0", "--interface", "127.0.0.1",
            "--tls-ciphers", "ECDHE-RSA-AES256-GCM-SHA384", "-k", CIRCLE.pubkey]
    with twistd(args, tmp_path) as process:
        port = process.wait_listening()
        assert negotiated(s_client(port, "-tls1_2")) == "ECDHE-RSA-AES256-GCM-SHA384"
        assert negotiated(s_client(port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")) == "(NONE)"


@pytest.mark.parametrize("ciphers, message", [
    ("NOPE-NOT-A-CIPHER", "--tls-ciphers 'NOPE-NOT-A-CIPHER' selects no cipher OpenSSL knows"),
    ("TLS_AES_128_GCM_SHA256", "selects no cipher OpenSSL knows"),
])
def test_bad_tls_ciphers_stop_start_up_with_one_line(tmp_path, rsa_files, ciphers, message):
    result = run_twistd_to_exit(["--tls-cert", rsa_files["combined"], "--tls-ciphers", ciphers, "-k", CIRCLE.pubkey],
                                tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


@needs_openssl
def test_listen_ssl_endpoint_strings_get_the_same_policy(tmp_path, rsa_files):
    listen = f"ssl:0:interface=127.0.0.1:privateKey={rsa_files['key']}:certKey={rsa_files['cert']}"
    with twistd(["--listen", listen, "-k", CIRCLE.pubkey], tmp_path) as process:
        port = process.wait_listening()
        assert "ALPN protocol: http/1.1" in s_client(port, "-alpn", "h2,http/1.1")
        assert negotiated(s_client(port, "-tls1_2", "-cipher", "AES128-SHA:@SECLEVEL=0")) == "(NONE)"
        assert negotiated(s_client(port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")) == \
            "ECDHE-RSA-AES128-GCM-SHA256"



@pytest.mark.parametrize("listen, message", [
    ("ssl:0:privateKey={missing}", "cannot read TLS certificate"),
    ("ssl:0:privateKey={key}:certKey={key}", "no PEM certificate in"),
    ("ssl:0:privateKey={key}:certKey={cert}:extraCertChain={key}", "no PEM certificate in"),
])
def test_an_ssl_listen_string_whose_files_cannot_be_used_stops_start_up_with_one_line(tmp_path, rsa_files, listen,
                                                                                       message):
    listen = listen.format(missing=tmp_path / "nope.pem", **rsa_files)
    result = run_twistd_to_exit(["--listen", listen, "-k", CIRCLE.pubkey], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout

# -- deadlines over TLS -------------------------------------------------------------------------

def test_tls_request_deadline_times_out_once_without_a_traceback(server, rsa_files):
    """An idle keep-alive connection after a request reaches the deadline; the client never
    answers the server's close_notify, so the server aborts it."""
    before = len(server.lines)
    context = client_tls(rsa_files["ca"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls_socket:
            tls_socket.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert tls_socket.recv(4096).startswith(b"HTTP/1.1 200")
            assert tls_socket.recv(4096) == b""  # the server's close_notify, at the deadline
            # Not answered: the server aborts after its abort timeout (2 s) and must not trip over
            # the closed transport then. Watch the TCP socket under the TLS layer for the end.
            with socket.socket(fileno=os.dup(tls_socket.fileno())) as tcp:
                tcp.settimeout(20)
                try:
                    assert tcp.recv(1, socket.MSG_PEEK) == b""
                except ConnectionResetError:
                    pass
    time.sleep(1)  # the abort timer of a second timeout, had one been armed, fires right after
    log = "".join(server.lines[before:])
    assert log.count("Timing out client") == 1, log
    assert "Traceback" not in log and "Unhandled" not in log, log


def test_close_frame_of_a_protocol_error_reaches_a_tls_client(server, rsa_files):
    """Autobahn answers an invalid close frame with 1002 and aborts; over TLS the abort used to
    discard the close frame still held in Twisted's write buffer."""
    context = client_tls(rsa_files["ca"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as ws:
            key = base64.b64encode(os.urandom(16)).decode()
            ws.sendall(f"GET /{CIRCLE.pubkey} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                received += ws.recv(4096)
            assert received.startswith(b"HTTP/1.1 101")
            received = received.split(b"\r\n\r\n", 1)[1]
            ws.sendall(bytes([0x88, 0x81, 0, 0, 0, 0, 0x03]))  # a close frame with a 1-byte body
            while True:
                data = ws.recv(4096)
                if not data:
                    break
                received += data
    assert received[:1] == b"\x88", received  # a close frame...
    assert int.from_bytes(received[2:4], "big") == 1002, received  # ...saying "protocol error"


@pytest.mark.skipif(shutil.which("certutil") is None, reason="needs certutil (Debian's libnss3-tools)")
def test_the_documented_certutil_step_works_on_a_fresh_home_and_again_for_a_new_ca(tmp_path):
    """docs/tls.md's step, as written, in a HOME with no ~/.pki at all (a fresh machine), then
    again after the development CA is made anew: both CAs are trusted, side by side."""
    import re

    from circles.tryout import devcert

    from ..support import ROOT
    docs = (ROOT / "docs" / "tls.md").read_text(encoding="utf-8")
    [step] = re.findall(r"```sh\n(.*?)```", docs[docs.index("To have a browser trust"):], re.S)
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))
    names = []
    for _ in range(2):
        devcert.make(str(tmp_path / "state" / "certs"))
        ca = subprocess.run(["openssl", "x509", "-in", "state/certs/ca.pem", "-noout", "-subject", "-nameopt",
                             "RFC2253"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        names.append(ca.strip().removeprefix("subject=CN="))
        # stdin closed: a step that asks for a password fails here instead of waiting
        done = subprocess.run(["sh", "-euc", step], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    listed = subprocess.run(["certutil", "-d", f"sql:{home}/.pki/nssdb", "-L"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60).stdout
    assert names[0] != names[1] and all(re.search(re.escape(name) + r"\s+C,,", listed) for name in names), listed
