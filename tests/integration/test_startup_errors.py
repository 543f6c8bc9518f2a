"""Start-up mistakes as a user makes them, with real ``twistd`` processes: each is one line on
stderr and a non-zero exit status (2 for a usage mistake, 1 for anything else), never a page of
usage text or a traceback. And ``--engine`` finds a module of the current directory."""

import socket
import subprocess
from pathlib import Path

import pytest
from websockets.sync.client import connect

from devtools.twistd import TWISTD

from ..support import Key, eventually_true, request, twistd

GENERATOR = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"  # a valid key
WORKER = ["-k", GENERATOR, "--exec", "sh {script_file}"]


def run_to_exit(plugin: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, "-n", "--pidfile=", plugin, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one line on stderr, after checking nothing else was printed."""
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Usage:" not in result.stdout
    return lines[0]


HINT = " (twistd {plugin} --help lists the options)"


@pytest.mark.parametrize("plugin, args, reason", [
    ("circles", ["--redis-url", "redis//x"], "--redis-url: unsupported scheme '': use redis://, rediss://, unix:// or redis+sentinel://"),
    ("circles", ["--bogus"], "option --bogus not recognized"),
    ("circles", ["--port", "abc"], "--port: invalid literal for int() with base 10: 'abc'"),
    ("circles", ["--max-plays", "-1"], "--max-plays: -1 is negative"),
    ("circles", ["--log-level", "loud"], "--log-level: 'loud' is not one of debug, info, warn, error, critical"),
    ("circles", ["--listen", "nonsense:1"], "'nonsense:1' is not a valid endpoint: Unknown endpoint type: 'nonsense'"),
    ("circles", ["--tls-key", "key.pem"], "--tls-key needs --tls-cert"),
    ("circles", ["--processes", "2", "--listen", "tcp:0"], "--processes shares --port (and --tls-cert) between "
     "processes; it cannot share --listen or --metrics-listen endpoints"),
    ("circles-worker", ["--exec", "sh {script_file}"], "give at least one circle with -k/--circle"),
    ("circles-worker", ["-k", GENERATOR], "give exactly one of --exec and --engine"),
    ("circles-worker", ["-k", "02abcd", "--exec", "sh {script_file}"], "-k/--circle: invalid circle '02abcd'"),
    ("circles-worker", [*WORKER, "-c", "0"], "--concurrency: 0 is not positive"),
    ("circles-worker", [*WORKER, "--redis-url", "http://h"], "--redis-url: unsupported scheme 'http'"),
    ("circles-worker", [*WORKER, "--redis-url", "redis+sentinel://s1:26379"],
     "--redis-url: no master name: redis+sentinel://host:port,.../MASTER_NAME/DB"),
    ("circles", ["--redis-url", "redis+sentinel://s1:26379,s2:x/m"], "--redis-url: not a Sentinel address 's2:x'"),
    ("circles-worker", ["-k", GENERATOR, "--engine", "run"], "--engine: 'run' is not package.module:callable"),
    ("circles-worker", ["-k", GENERATOR, "--engine", "no_such_module_xyz:run"],
     "--engine: no module named 'no_such_module_xyz' (looked in the current directory and on the Python path)"),
])
def test_a_usage_mistake_is_one_line_and_status_2(tmp_path, plugin, args, reason):
    result = run_to_exit(plugin, args, tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith(f"{plugin}: {reason}") and line.endswith(HINT.format(plugin=plugin))
    assert result.stdout == ""


@pytest.mark.parametrize("args, line", [
    (["-k", "02abcd"], "circles: -k/--circle: invalid circle '02abcd': public key must be 33 bytes (compressed) "
     "or 65 bytes (uncompressed)"),
    (["--tls-cert", "missing.pem"], "circles: cannot read TLS certificate 'missing.pem': No such file or directory"),
    (["--stripe-script", "missing.rhai"], "circles: --stripe-script: cannot read missing.rhai: No such file or "
     "directory"),
    (["--stripe-secret-file", "missing.txt"], "circles: webhook secrets: "),
    (["--tls-ciphers", "NOTACIPHER"], "circles: "),
    (["--port", "0", "--interface", "127.0.0.1", "--state-dir", "/proc/no/such"],
     "circles: cannot make the state directory /proc/no/such (--state-dir): No such file or directory"),
    (["--state-dir", "/tmp/" + "d" * 120], "circles: state directory path too long for a unix socket: /tmp/ddd"),
])
def test_a_bad_file_or_value_is_one_line_and_status_1(tmp_path, args, line):
    result = run_to_exit("circles", args, tmp_path)
    assert result.returncode == 1
    assert one_line(result).startswith(line)


def test_a_port_in_use_is_one_line_and_status_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_to_exit("circles", ["--port", str(port), "--interface", "127.0.0.1"], tmp_path)
    assert result.returncode == 1
    assert one_line(result) == f"circles: cannot listen on 127.0.0.1:{port}: Address already in use"
    # the log (stdout under -n) says it once too, and has no traceback either
    assert result.stdout.count("cannot listen on") == 1


def test_a_unix_socket_in_a_missing_directory_is_one_line(tmp_path):
    result = run_to_exit("circles", ["--listen", f"unix:{tmp_path}/missing/circles.sock"], tmp_path)
    assert result.returncode == 1
    assert one_line(result) == f"circles: cannot listen on unix:{tmp_path}/missing/circles.sock: " \
                               "No such file or directory"


def test_a_daemon_that_cannot_listen_tells_its_parent_and_leaves_no_pid_file(tmp_path):
    """Without -n, twistd's daemon tells the waiting parent, which says so (twistd's two lines)
    and exits 1; the PID file is removed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([TWISTD, f"--pidfile={tmp_path}/circles.pid", f"--logfile={tmp_path}/circles.log",
                                 "circles", "--port", str(port), "--interface", "127.0.0.1"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith("An error has occurred: ")
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in first
    assert "Traceback" not in result.stderr
    # the daemon removes it right after telling the parent
    assert eventually_true(lambda: not (tmp_path / "circles.pid").exists(), timeout=10)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in (tmp_path / "circles.log").read_text()


ENGINES = {
    "broken.py": "import no_such_module_xyz\n",
    "syntax.py": "def run(script, context):\n    return (\n",
    "boom.py": "raise RuntimeError('boom at import')\n",
    "shouting.py": "def run(script, context):\n    return script.upper() + ' for ' + context.circle[:8]\n",
}


@pytest.mark.parametrize("engine, reason", [
    ("broken:run", "--engine: importing broken failed: No module named 'no_such_module_xyz'"),
    ("syntax:run", "--engine: importing syntax failed: SyntaxError: '(' was never closed (syntax.py, line 2)"),
    ("boom:run", "--engine: importing boom failed: RuntimeError: boom at import"),
    ("shouting:nope", "--engine: shouting has no nope"),
])
def test_an_engine_that_cannot_be_loaded_says_why(tmp_path, engine, reason):
    for name, text in ENGINES.items():
        (tmp_path / name).write_text(text)
    result = run_to_exit("circles-worker", ["-k", GENERATOR, "--engine", engine], tmp_path)
    assert result.returncode == 2
    assert one_line(result).startswith(f"circles-worker: {reason}")


def test_engine_from_the_current_directory(tmp_path):
    """``--engine shouting:run`` with shouting.py where the worker runs: it plays."""
    (tmp_path / "shouting.py").write_text(ENGINES["shouting.py"])
    circle = Key()
    with twistd(["--port", "0", "--interface", "127.0.0.1", "-k", circle.pubkey], tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--engine", "shouting:run"], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")  # until then a play is answered -32004 at once
        worker.wait_for("waiting for tasks")
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
            assert request(ws, "play", {"script": "hello", "timeout": 10})["result"] == \
                {"output": f"HELLO for {circle.pubkey[:8]}"}
    assert "Traceback" not in server.output + worker.output
