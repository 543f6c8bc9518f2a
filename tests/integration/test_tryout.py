"""``./scripts/try``: started by a test, the printed line pasted, Ctrl-C, nothing left behind."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time

from ..support import ROOT, alive


def _children() -> dict:
    """pid -> (parent pid, command name) of every process, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                name, rest = text.split("(", 1)[1].rsplit(")", 1)
                parents[int(entry)] = (int(rest.split()[1]), name)
            except (OSError, IndexError, ValueError):
                pass
    return parents


def descendants(pid: int) -> set:
    table = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def test_try_out_starts_answers_the_pasted_line_and_stops_cleanly(tmp_path):
    env = dict(os.environ, CIRCLES_SKIP_SETUP="1")
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "server.log").write_text("the previous run\n")
    proc = subprocess.Popen([str(ROOT / "scripts" / "try"), "--state-dir", str(state), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(".rhai" in line or " play " in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        paste = next(line for line in lines if " play " in line).strip()
        # The pasted line really answers, from the directory scripts/try runs in.
        result = subprocess.run(paste, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert os.stat(state / "user.key").st_mode & 0o777 == 0o600
        assert re.fullmatch(r"hello, 0[23][0-9a-f]{64}\n42\n", result.stdout), result.stdout
        assert any("https://localhost:" in line and "/playground/" in line for line in lines)
        # So does the operator's line: the circle, its one live worker, an empty queue, no dead letters.
        operate = next(line for line in lines if " tasks stats " in line).split("operate", 1)[1].strip()
        result = subprocess.run(operate, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and re.search(r"\b[0-9a-f]{66} +1 +0 +0\n", result.stdout), \
            result.stdout + result.stderr
        started = descendants(proc.pid)
        table = _children()
        names = [table[pid][1] for pid in started if pid in table]
        assert "redis-server" in names and len(names) >= 3, names  # server, worker, their Redis
        # A second try-out on the same state directory stops at once, touching nothing.
        second = subprocess.run([str(ROOT / "scripts" / "try"), "--state-dir", str(state), "--port", "0"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 1 and f"another try-out (pid {proc.pid}) is running on" in second.stdout, \
            second.stdout + second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        # The previous run's log was kept, this run's is new.
        assert (state / "logs" / "server.log.1").read_text() == "the previous run\n"
        assert "the previous run" not in (state / "logs" / "server.log").read_text()
        assert "connected to Redis" in (state / "logs" / "server.log").read_text()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if alive(pid)], "".join(lines)
    assert "Traceback" not in "".join(lines)
    for log in ("server.log", "worker.log"):
        assert "Traceback" not in (state / "logs" / log).read_text()


def test_try_out_on_a_state_dir_in_use_says_so_once(tmp_path):
    """A second try-out on the same --state-dir (here a server already on its Redis socket):
    one line saying why, no traceback, and nothing left running."""
    from ..support import twistd
    env = dict(os.environ, CIRCLES_SKIP_SETUP="1")
    env.pop("CIRCLES_REDIS_URL", None)
    state = tmp_path / "state"
    with twistd(["--port", "0", "--interface", "127.0.0.1", "--state-dir", str(state / "run")], tmp_path) as first:
        first.wait_for("connected to Redis")
        result = subprocess.run([str(ROOT / "scripts" / "try"), "--state-dir", str(state), "--port", "0"],
                                capture_output=True, text=True, env=env, timeout=180)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "a Redis is already running on" in output, output
        assert "Traceback" not in output and "Unhandled error" not in output, output
        assert first.proc.poll() is None


def _start_try_out(state, env) -> tuple[subprocess.Popen, list]:
    proc = subprocess.Popen([str(ROOT / "scripts" / "try"), "--state-dir", str(state), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any(" play " in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    return proc, lines


def test_try_out_prints_absolute_paths_and_runs_the_webhook_example_of_the_docs(tmp_path):
    """The pasted line works from another directory (its paths are absolute), and
    docs/webhooks.md's "On the try-out" command, run as written from where the try-out's state is,
    is answered 200 and the event's script runs (as does an event signed by stripe's own signer)."""
    import json

    import stripe
    env = dict(os.environ, CIRCLES_SKIP_SETUP="1")
    state = tmp_path / "state"
    proc, lines = _start_try_out(state, env)
    try:
        paste = next(line for line in lines if " play " in line).strip()
        words = shlex.split(paste)
        assert os.path.isabs(words[0]) and os.path.isabs(words[words.index("--ca") + 1]), paste
        assert os.path.isabs(words[words.index("--key-file") + 1]), paste
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = subprocess.run(paste, shell=True, cwd=elsewhere, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.endswith("\n42\n"), result.stdout + result.stderr
        port = int(re.search(r"wss://localhost:(\d+)/", paste).group(1))

        docs = (ROOT / "docs" / "webhooks.md").read_text(encoding="utf-8")
        [command] = re.findall(r"```sh\n(.*?)```", docs[docs.index("## On the try-out"):], re.S)
        answer = subprocess.run(["bash", "-euc", command.replace("localhost:8443", f"localhost:{port}")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0, answer.stderr
        reply = json.loads(answer.stdout)
        assert reply["received"] is True and "duplicate" not in reply, reply

        body = json.dumps({"id": "evt_signed_by_stripe", "object": "event", "type": "charge.succeeded",
                           "created": 1700000000, "livemode": False, "api_version": None,
                           "data": {"object": {"id": "ch_1"}}})
        secret = (state / "webhooks" / "stripe.secret").read_text().strip()
        header = stripe.WebhookSignature.generate_signature_header(body, secret)
        circle = (state / "circle.pub").read_text().strip()
        signed = subprocess.run(["curl", "-sS", "--cacert", str(state / "certs" / "ca.pem"), "-H",
                                 f"Stripe-Signature: {header}", "--data", body,
                                 f"https://localhost:{port}/webhooks/stripe/{circle}"],
                                capture_output=True, text=True, timeout=60)
        assert json.loads(signed.stdout)["received"] is True, signed.stdout + signed.stderr

        for task in (reply["task_id"], json.loads(signed.stdout)["task_id"]):
            # the docs' step: the task's status, kept 30 s after the worker ran it
            deadline, status = time.monotonic() + 25, ""
            while status not in ("completed", "error") and time.monotonic() < deadline:
                status = subprocess.run(["redis-cli", "-s", "state/run/redis.sock", "hget", f"circles:task:{task}",
                                         "status"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
                time.sleep(0.1)
            assert status == "completed", (status, (state / "logs" / "worker.log").read_text())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(lines)


def test_devcert_runs_without_warnings_and_names_each_ca_apart(tmp_path):
    """``python -m circles.tryout.devcert DIR`` prints nothing on stderr (no RuntimeWarning from a
    module imported twice), and two generations of the development CA have different names."""
    import sys

    from cryptography import x509
    names = []
    for run in ("one", "two"):
        made = subprocess.run([sys.executable, "-m", "circles.tryout.devcert", str(tmp_path / run)],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and made.stderr == "", made.stderr
        ca = x509.load_pem_x509_certificate((tmp_path / run / "ca.pem").read_bytes())
        names.append(ca.subject.rfc4514_string())
        assert ca.subject.rfc4514_string().startswith("CN=circles development CA ")
    assert names[0] != names[1], names
