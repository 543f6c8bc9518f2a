"""The ``circles`` command as a user runs it: a subprocess against twistd server and worker."""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from twisted.copyright import version as twisted_version

import circles as package
from circles.client.signing import KEY_ENV, public_key, read_key_file
from devtools.twistd import TWISTD

from ..support import ROOT, Key, twistd

CIRCLES = str(Path(sys.executable).with_name("circles"))
TINY_WORKER = ["--engine", "circles.worker.tiny_engine:run"]


def circles(*args, env=None, input=None, cwd=None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    environment.update(env or {})
    return subprocess.run([CIRCLES, *args], capture_output=True, text=True, timeout=120, env=environment,
                          input=input, cwd=cwd)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tls_files):
    """An --auth server over TLS and a worker running the tiny engine; yields (url, ca)."""
    directory = tmp_path_factory.mktemp("cli")
    circle = Key()
    args = ["--auth", "--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"], "-k", circle.pubkey,
            "--port", "0", "--interface", "127.0.0.1"]
    with twistd(args, directory) as server, \
            twistd(["-k", circle.pubkey, *TINY_WORKER], directory, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        yield f"wss://localhost:{port}/{circle.pubkey}", tls_files["ca"], circle.pubkey


@pytest.fixture
def key_file(tmp_path):
    result = circles("keygen", "--out", str(tmp_path / "user.key"))
    assert result.returncode == 0, result.stderr
    return str(tmp_path / "user.key"), result.stdout.strip()


def test_keygen_writes_a_private_key_file_only_the_owner_reads(tmp_path, key_file):
    path, pubkey = key_file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert public_key(read_key_file(path)) == pubkey and len(pubkey) == 66
    # An existing key is never overwritten.
    again = circles("keygen", "--out", path)
    assert again.returncode == 2 and "exists" in again.stderr
    assert public_key(read_key_file(path)) == pubkey
    # A private key is printed only when asked for with --out -: the key alone on stdout.
    bare = circles("keygen")
    assert (bare.returncode, bare.stdout) == (2, "")
    assert "the following arguments are required: --out" in bare.stderr
    printed = circles("keygen", "--out", "-")
    assert printed.returncode == 0 and len(printed.stdout) == 65
    assert printed.stderr == f"public key: {public_key(printed.stdout.strip())}\n"
    made = json.loads(circles("keygen", "--out", "-", "--json").stdout)
    assert public_key(made["private_key"]) == made["pubkey"]
    assert json.loads(circles("keygen", "--out", str(tmp_path / "b.key"), "--json").stdout) == \
        {"pubkey": public_key(read_key_file(str(tmp_path / "b.key"))), "key_file": str(tmp_path / "b.key")}


def test_version_of_the_command_and_of_both_twistd_plugins():
    version = package.__version__
    assert metadata.version("circles-gateway") == version  # pyproject.toml reads it from circles/__init__.py: one source
    assert circles("--version").stdout == f"circles {version}\n"
    for plugin in ("circles", "circles-worker"):
        shown = subprocess.run([TWISTD, plugin, "--version"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines()[:2] == [f"circles {version}", f"Twisted {twisted_version}"]


def test_python_dash_m_circles_is_the_circles_command(key_file):
    path, pubkey = key_file
    module = subprocess.run([sys.executable, "-m", "circles", "pubkey", "--key-file", path], capture_output=True,
                            text=True, timeout=60)
    assert (module.returncode, module.stdout) == (0, pubkey + "\n")
    usage = subprocess.run([sys.executable, "-m", "circles", "nonsense"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: circles ")


def test_pubkey_from_file_or_environment_never_argv(tmp_path, key_file):
    path, pubkey = key_file
    assert circles("pubkey", "--key-file", path).stdout.strip() == pubkey
    secret = read_key_file(path).secret.hex()
    assert json.loads(circles("pubkey", "--json", env={KEY_ENV: secret}).stdout) == {"pubkey": pubkey}
    none = circles("pubkey")
    assert none.returncode == 2 and KEY_ENV in none.stderr
    os.chmod(path, 0o644)  # readable by others: refused, as ssh does
    loose = circles("pubkey", "--key-file", path)
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    help_text = circles("play", "--help").stdout
    assert "--key-file" in help_text and "--key " not in help_text and "--private-key" not in help_text


def test_play_prints_output_and_exit_status(served, key_file, tmp_path):
    url, ca, circle = served
    path, pubkey = key_file
    ok = circles("play", url, "--ca", ca, "--key-file", path, 'print("hi " + CALLER_ID); 6 * 7')
    assert (ok.returncode, ok.stdout) == (0, f"hi {pubkey}\n42\n"), ok.stderr
    as_json = circles("play", url, "--ca", ca, "--key-file", path, "--json", "--scheme", "ecdsa", "CONTEXT_ID")
    assert json.loads(as_json.stdout) == {"output": circle}
    script = tmp_path / "script.rhai"
    script.write_text("let a = 20;\na + 1\n")
    assert circles("play", url, "--ca", ca, "--key-file", path, "-f", str(script)).stdout == "21\n"
    assert circles("play", url, "--ca", ca, "--key-file", path, "-", input="2 ** 5").stdout == "32\n"
    secret = read_key_file(path).secret.hex()
    assert circles("play", url, "--ca", ca, "1 + 1", env={KEY_ENV: secret}).stdout == "2\n"


def test_errors_exit_non_zero_with_the_json_rpc_error(served, key_file):
    url, ca, circle = served
    path, _ = key_file
    failed = circles("play", url, "--ca", ca, "--key-file", path, "1 / 0")
    assert failed.returncode == 1 and failed.stdout == ""
    assert "-32005 Script failed: line 1, column 3: division by zero" in failed.stderr
    failed = circles("play", url, "--ca", ca, "--key-file", path, "--json", "nope(")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["code"] == -32005
    anonymous = circles("play", url, "--ca", ca, "--json", "1")
    assert anonymous.returncode == 1 and json.loads(anonymous.stdout)["error"]["code"] == -32001
    unreachable = circles("whoami", "ws://127.0.0.1:1/" + circle)
    assert unreachable.returncode == 3
    both = circles("play", url, "--ca", ca, "-f", "x", "1")
    assert both.returncode == 2
    assert circles("nonsense").returncode == 2


def one_json_object(result: subprocess.CompletedProcess) -> dict:
    """stdout holds exactly one JSON object (json.loads refuses two, or text around one)."""
    value = json.loads(result.stdout)
    assert isinstance(value, dict), result.stdout
    return value


def test_with_json_every_outcome_is_one_json_object(served, key_file, tmp_path):
    """Connection errors (and usage errors) printed no JSON at all."""
    url, ca, circle = served
    path, _ = key_file
    ok = circles("play", url, "--ca", ca, "--key-file", path, "--json", "6 * 7")
    assert (ok.returncode, one_json_object(ok)) == (0, {"output": "42"})
    failed = circles("play", url, "--ca", ca, "--key-file", path, "--json", "1 / 0")
    assert failed.returncode == 1
    assert one_json_object(failed) == {"error": {"code": -32005, "message": "Script failed",
                                                 "data": "line 1, column 3: division by zero"},
                                       "kind": "rpc", "exit": 1}
    refused = circles("whoami", f"ws://127.0.0.1:1/{circle}", "--json")
    assert refused.returncode == 3
    assert one_json_object(refused) == {
        "error": {"message": f"cannot open ws://127.0.0.1:1/{circle}: Connection was refused by other side: 111: "
                             "Connection refused."}, "kind": "connection", "exit": 3}
    untrusted = circles("whoami", url, "--json")  # the test CA is not in the system store
    answer = one_json_object(untrusted)
    assert (untrusted.returncode, answer["kind"], answer["exit"]) == (3, "connection", 3)
    assert "certificate verify failed" in answer["error"]["message"] and "--ca FILE" in answer["error"]["message"]
    ours = circles("whoami", url.rsplit("/", 1)[0], "--json")  # a usage error the command finds
    assert ours.returncode == 2 and one_json_object(ours)["kind"] == "usage"
    assert "names no circle" in one_json_object(ours)["error"]["message"]
    for args in (["whoami", "--json"], ["nonsense", "--json"], ["play", url, "--json", "--timeout", "soon", "1"],
                 ["tasks", "requeue", "--json", "--nope"]):  # argparse's own: usage text on stderr, JSON on stdout
        usage = circles(*args)
        answer = one_json_object(usage)
        assert (usage.returncode, answer["kind"], answer["exit"]) == (2, "usage", 2), args
        assert usage.stderr.startswith("usage: circles") and answer["error"]["message"].startswith("circles"), args
    # --json before the command, as in `circles --json whoami URL`: the same outcomes
    first = circles("--json", "whoami", f"ws://127.0.0.1:1/{circle}")
    assert (first.returncode, one_json_object(first)) == (3, one_json_object(refused))
    first = circles("--json", "play", url, "--ca", ca, "--key-file", path, "6 * 7")
    assert (first.returncode, one_json_object(first)) == (0, {"output": "42"})
    first = circles("--json", "tasks", "requeue", "--nope")
    assert (first.returncode, one_json_object(first)["kind"]) == (2, "usage")
    without = circles("whoami")  # without --json: argparse's usage error as ever, nothing on stdout
    assert (without.returncode, without.stdout) == (2, "") and without.stderr.startswith("usage: circles whoami")


def test_authentication_required_says_how_to_authenticate(served):
    """-32001 said authentication was required, not how to give it."""
    url, ca, circle = served
    anonymous = circles("play", url, "--ca", ca, "1")
    assert (anonymous.returncode, anonymous.stdout) == (1, "")
    assert anonymous.stderr == (f"circles: error -32001 Authentication required; give --key-file FILE (or set "
                                f"${KEY_ENV}) to authenticate: this server lets only a key play\n")
    as_json = one_json_object(circles("play", url, "--ca", ca, "--json", "1"))
    assert as_json["error"]["code"] == -32001 and as_json["kind"] == "rpc"
    assert as_json["hint"] == f"give --key-file FILE (or set ${KEY_ENV}) to authenticate: this server lets only a key play"


def test_output_printed_before_a_script_error_comes_with_it(served, key_file):
    """What a script printed before failing was dropped. Through a real worker (the tiny
    engine, in its child process) and Redis: the error's data carries it, the command prints it."""
    url, ca, circle = served
    path, _ = key_file
    script = 'print("before"); print("again");\n1 / 0'
    failed = circles("play", url, "--ca", ca, "--key-file", path, script)
    assert (failed.returncode, failed.stdout) == (1, "before\nagain\n")
    assert failed.stderr == "circles: error -32005 Script failed: line 2, column 3: division by zero\n"
    as_json = one_json_object(circles("play", url, "--ca", ca, "--key-file", path, "--json", script))
    assert as_json["error"] == {"code": -32005, "message": "Script failed",
                                "data": {"error": "line 2, column 3: division by zero", "output": "before\nagain"}}
    silent = one_json_object(circles("play", url, "--ca", ca, "--key-file", path, "--json", "1 / 0"))
    assert silent["error"]["data"] == "line 1, column 3: division by zero"  # nothing printed: the text alone


def test_whoami_and_discover(served, key_file):
    url, ca, circle = served
    path, pubkey = key_file
    anonymous = json.loads(circles("whoami", url, "--ca", ca, "--json").stdout)
    assert anonymous == {"circle": circle, "authenticated": False, "pubkey": None}
    signed_in = circles("whoami", url, "--ca", ca, "--key-file", path)
    assert "authenticated: true" in signed_in.stdout and pubkey in signed_in.stdout
    with open(ROOT / "openrpc.json") as f:
        assert json.loads(circles("discover", url, "--ca", ca).stdout) == json.load(f)


def test_a_url_naming_no_circle_is_a_usage_error_said_before_connecting(served):
    url, ca, circle = served
    root = url.rsplit("/", 1)[0]  # wss://localhost:PORT, a server that would answer "upgrade failed [200]"
    uncompressed = Key(bytes.fromhex("01" * 32))
    for given, why in [
            (root, f"{root} names no circle: the URL needs /{{circle_pk}}, the circle's public key (66 hex digits), "
                   f"e.g. {root}/02…"),
            (root + "/", f"{root}/ names no circle: the URL needs /{{circle_pk}}, the circle's public key "
                         f"(66 hex digits), e.g. {root}/02…"),
            (root + "/playground", f"{root}/playground: 'playground' is not a circle id (public key is not hex); "
                                   "the URL needs /{circle_pk}, the circle's public key (66 hex digits)"),
            (f"{root}/{uncompressed.uncompressed}", f"{root}/{uncompressed.uncompressed}: a circle is named by its "
                                                    f"compressed public key, lower-case: /{uncompressed.pubkey}"),
            ("https" + url[3:], f"https{url[3:]} is not a WebSocket URL: give wss://host:port/{{circle_pk}}")]:
        result = circles("whoami", given, "--ca", ca)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"circles: {why}\n")


def test_an_unknown_circle_is_said_in_words(served):
    url, ca, circle = served
    other = Key().pubkey
    unknown = url.replace(circle, other)
    result = circles("whoami", unknown, "--ca", ca)
    port = url.split(":")[2].split("/")[0]
    assert (result.returncode, result.stderr) == (
        3, f"circles: cannot open {unknown}: the server at localhost:{port} does not serve circle {other} "
           "(HTTP 404 No such circle)\n")


def test_a_certificate_that_does_not_verify_is_said_in_one_line_with_the_way_out(served, key_file, tmp_path):
    url, ca, circle = served
    path, _ = key_file
    port = url.split(":")[2].split("/")[0]
    with open(ca, "rb") as f:
        issuer = x509.load_pem_x509_certificate(f.read()).subject.rfc4514_string()
    hint = "; --ca FILE trusts a private CA, --insecure skips the check (development only)\n"
    untrusted = circles("play", url, "--key-file", path, "1")  # the test CA is not in the system store
    assert (untrusted.returncode, untrusted.stdout, untrusted.stderr) == (
        3, "", f"circles: cannot open {url}: certificate verify failed for localhost:{port}: unable to get local "
               f"issuer certificate (issued by {issuer}, not in the system trust store){hint}")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    wrong_ca = circles("whoami", url, "--ca", str(other_ca))
    other_name = x509.load_pem_x509_certificate(other_ca.read_bytes()).subject.rfc4514_string()
    assert wrong_ca.returncode == 3 and wrong_ca.stderr.endswith(
        f"(issued by {issuer}, but {other_ca} holds {other_name}: the server's certificate was signed by another CA "
        f"than that file's (made by another run or for another server?): give the CA file that signed it){hint}")
    by_address = url.replace("localhost", "127.1")  # 127.0.0.1, under a name the certificate does not carry
    wrong_name = circles("whoami", by_address, "--ca", ca)
    assert (wrong_name.returncode, wrong_name.stderr) == (
        3, f"circles: cannot open {by_address}: certificate verify failed for 127.1:{port}: it is for localhost, "
           f"127.0.0.1, ::1, not 127.1{hint}")
    assert circles("whoami", url, "--insecure").returncode == 0


def test_an_expired_certificate_is_said_so(tmp_path):
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue_cert("localhost", not_before=now - datetime.timedelta(days=2),
                            not_after=now - datetime.timedelta(days=1))
    expired.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "expired.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    circle = Key().pubkey
    with twistd(["--tls-cert", str(tmp_path / "expired.pem"), "-k", circle, "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server:
        port = server.wait_listening()
        url = f"wss://localhost:{port}/{circle}"
        result = circles("whoami", url, "--ca", str(tmp_path / "ca.pem"))
    assert (result.returncode, result.stderr) == (
        3, f"circles: cannot open {url}: certificate verify failed for localhost:{port}: certificate has expired; "
           "--ca FILE trusts a private CA, --insecure skips the check (development only)\n")


def test_a_ca_file_that_cannot_be_used_is_a_usage_error(served, tmp_path):
    url, ca, circle = served
    missing = circles("whoami", url, "--ca", str(tmp_path / "none.pem"))
    assert (missing.returncode, missing.stderr) == (
        2, f"circles: --ca: cannot read CA file {str(tmp_path / 'none.pem')!r}: No such file or directory\n")
    (tmp_path / "not.pem").write_text("not a certificate\n")
    garbage = circles("whoami", url, "--ca", str(tmp_path / "not.pem"))
    assert (garbage.returncode, garbage.stderr) == (
        2, f"circles: --ca: no PEM certificate in {str(tmp_path / 'not.pem')!r}\n")
    both = circles("whoami", url, "--ca", ca, "--insecure")
    assert (both.returncode, both.stderr) == (2, "circles: give --ca FILE or --insecure, not both\n")
    plain = circles("whoami", url.replace("wss://", "ws://"), "--ca", ca)
    assert (plain.returncode, plain.stderr) == (2, "circles: --ca and --insecure are for wss:// URLs only\n")


def closed_stdout(*args) -> subprocess.CompletedProcess:
    """``circles ARGS`` writing into a pipe whose reader is already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        environment = {k: v for k, v in os.environ.items() if k != KEY_ENV}
        return subprocess.run([CIRCLES, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=environment)
    finally:
        os.close(write)


def test_a_reader_gone_ends_the_command_silently_by_sigpipe(served, key_file, tmp_path):
    url, ca, circle = served
    path, _ = key_file
    for args in (["pubkey", "--key-file", path], ["keygen", "--out", str(tmp_path / "new.key")],
                 ["whoami", url, "--ca", ca], ["whoami", url, "--ca", ca, "--json"], ["discover", url, "--ca", ca],
                 ["play", url, "--ca", ca, "--key-file", path, "6 * 7"]):
        result = closed_stdout(*args)
        assert (result.returncode, result.stderr) == (-signal.SIGPIPE, ""), args
    # As a user meets it: the first line, nothing on stderr, and the shell sees the reader's status.
    shell = subprocess.run(["bash", "-c", f"{CIRCLES} whoami {url} --ca {ca} | head -1"], capture_output=True,
                           text=True, timeout=120)
    assert (shell.returncode, shell.stdout, shell.stderr) == (0, f"circle:        {circle}\n", "")


def test_a_server_that_stops_answering_mid_call_is_an_error_not_a_hang(tmp_path):
    """The server is stopped (SIGSTOP: its connection stays open, nothing answers) while a play
    waits: the CLI's pings go unanswered and it exits 3, rather than wait forever."""
    circle = Key()
    with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        # A live worker that takes no task: the play waits at the server (its script timeout is 30 s).
        socket_path = tmp_path / "circles-state" / "redis.sock"
        subprocess.run(["redis-cli", "-s", str(socket_path), "ZADD", f"circles:workers:{circle.pubkey}", str(10 ** 11),
                        "pretend"], check=True, capture_output=True, timeout=30)
        call = subprocess.Popen([CIRCLES, "play", f"ws://127.0.0.1:{port}/{circle.pubkey}", "--connect-timeout", "2",
                                 "--json", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_in_flight(port)
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                out, err = call.communicate(timeout=120)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
        finally:
            if call.poll() is None:
                call.kill()
                call.wait()
    assert call.returncode == 3, (out, err)
    assert "before the reply to play arrived" in err


def wait_until_in_flight(port: int) -> None:
    """Until the server's metrics count one play waiting for a worker."""
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            if "circles_tasks_in_flight 1" in response.read().decode():
                return
        assert time.monotonic() < deadline, "the play never reached the server"
        time.sleep(0.05)


def test_ws_to_a_tls_port_and_another_development_ca_are_said_with_their_likely_cause(tmp_path, monkeypatch):
    """``ws://`` to a ``wss://`` port: the client says to use wss://, the server's log says what
    came. A ``--ca`` of another development CA: its name differs (each is named apart), and one
    of the same name (as every one was before) is said to be a CA of that name with another key."""
    from circles.tryout import devcert
    served_by = devcert.make(str(tmp_path / "served"))
    other = devcert.make(str(tmp_path / "other"))
    monkeypatch.setattr(devcert, "ca_common_name", lambda now: "circles development CA")
    same_a, same_b = devcert.make(str(tmp_path / "same-a")), devcert.make(str(tmp_path / "same-b"))
    hint = "; --ca FILE trusts a private CA, --insecure skips the check (development only)\n"
    circle = Key().pubkey
    for cert, ca, wrong_ca, why in [
            (served_by, served_by["ca"], other["ca"], None),
            (same_a, same_a["ca"], same_b["ca"], "and {ca} holds a CA of that name but with another key: the "
             "server's certificate was signed by another CA of the same name (one made again, e.g. by another "
             "try-out run or state directory): give the CA file that signed it")]:
        issuer = x509.load_pem_x509_certificate(open(ca, "rb").read()).subject.rfc4514_string()
        held = x509.load_pem_x509_certificate(open(wrong_ca, "rb").read()).subject.rfc4514_string()
        with twistd(["--tls-cert", cert["cert"], "--tls-key", cert["key"], "-k", circle, "--port", "0",
                     "--interface", "127.0.0.1"], tmp_path) as server:
            port = server.wait_listening()
            plain = circles("whoami", f"ws://localhost:{port}/{circle}")
            assert (plain.returncode, plain.stderr) == (
                3, f"circles: cannot open ws://localhost:{port}/{circle}: the connection closed before the WebSocket "
                   f"opened, with no answer: if localhost:{port} serves TLS, use wss:// (a TLS port closes a ws:// "
                   "request so; so does a load balancer with no server behind it)\n")
            server.wait_for("a plain HTTP request (ws:// or http://) from 127.0.0.1 on this TLS port: the client "
                            "must use wss:// (https://)")
            url = f"wss://localhost:{port}/{circle}"
            result = circles("whoami", url, "--ca", wrong_ca)
            assert circles("whoami", url, "--ca", ca).returncode == 0
        if why is None:
            assert issuer != held
            assert result.stderr.endswith(
                f"(issued by {issuer}, but {wrong_ca} holds {held}: the server's certificate was signed by another "
                f"CA than that file's (made by another run or for another server?): give the CA file that signed "
                f"it){hint}"), result.stderr
        else:
            assert issuer == held == "CN=circles development CA"
            assert result.stderr == (f"circles: cannot open {url}: certificate verify failed for localhost:{port}: "
                                     f"certificate signature failure (issued by {issuer}, {why.format(ca=wrong_ca)})"
                                     f"{hint}"), result.stderr
        assert result.returncode == 3
        assert "Traceback" not in server.output
