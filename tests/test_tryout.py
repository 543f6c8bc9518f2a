"""``./scripts/try``: started by a test, the printed line pasted, Ctrl-C, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

from .support import ROOT, alive


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
        while not any(".rhai" in l or " play " in l for l in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        paste = next(l for l in lines if " play " in l).strip()
        # The pasted line really answers, from the directory scripts/try runs in.
        result = subprocess.run(paste, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert os.stat(state / "user.key").st_mode & 0o777 == 0o600
        assert re.fullmatch(r"hello, 0[23][0-9a-f]{64}\n42\n", result.stdout), result.stdout
        assert any("https://localhost:" in l and "/playground/" in l for l in lines)
        # So does the operator's line: the circle, its one live worker, an empty queue, no dead letters.
        operate = next(l for l in lines if " tasks stats " in l).split("operate", 1)[1].strip()
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
    from .support import twistd
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
