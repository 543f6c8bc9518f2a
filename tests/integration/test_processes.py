"""``--processes N``: N server processes share one port and one Redis, and stop together."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from bench.accept_burst import open_at_once
from circles.server.processes.accept import TURN
from devtools.twistd import TWISTD

from ..support import Key, alive, authenticate, eventually_true, request, twistd


def _server_processes(parent_pid: int) -> list:
    parent = psutil.Process(parent_pid)
    children = [c for c in parent.children() if "redis-server" not in " ".join(c.cmdline())]
    return [parent, *children]


def _established(process: psutil.Process, port: int) -> int:
    return sum(1 for c in process.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def test_two_processes_share_the_port_and_redis_and_stop_together(tmp_path):
    circle, user = Key(), Key()
    with twistd(["--auth", "-k", circle.pubkey, "--processes", "2", "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server, \
            twistd(["-k", circle.pubkey, "--exec", "sh {script_file}", "-c", "8"], tmp_path,
                   plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("started server process 2")
        worker.wait_for("waiting for tasks")
        deadline = time.monotonic() + 60
        while server.output.count("connected to Redis") < 2:  # each process has its own script runner
            assert time.monotonic() < deadline, server.output
            time.sleep(0.1)
        processes = _server_processes(server.proc.pid)
        assert len(processes) == 2
        clients = [connect(f"ws://127.0.0.1:{port}/{circle.pubkey}").__enter__() for _ in range(40)]
        try:
            time.sleep(0.5)
            held = [_established(p, port) for p in processes]
            assert sum(held) == 40 and all(held), held  # the kernel spread them over both
            for i, ws in enumerate(clients[:10]):  # plays through both processes' script runners
                assert authenticate(ws, user)["result"]["authenticated"]
                assert request(ws, "play", {"script": f"echo {i}"})["result"] == {"output": f"{i}"}
        finally:
            for ws in clients:
                ws.close()
        redis = [c for c in psutil.Process(server.proc.pid).children() if "redis-server" in " ".join(c.cmdline())]
        assert len(redis) == 1  # one private Redis, started by the first process
        # SIGTERM to the first process stops them all; twistd exits by re-raising the signal.
        assert server.stop() in (0, -signal.SIGTERM)
    for process in [*processes, *redis]:
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in server.output


@pytest.mark.parametrize("option", ["--listen", "--metrics-listen"])
def test_processes_refuses_listen_strings(tmp_path, option):
    """Every process would bind the endpoint: with --metrics-listen the second one died of
    "Address already in use" (a traceback) and the server ran on with one process."""
    from ..support import run_twistd_to_exit
    result = run_twistd_to_exit(["--processes", "2", option, "tcp:0"], tmp_path)
    assert result.returncode != 0 and "--processes" in result.stdout + result.stderr


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("spelling", [["--proc", "2"], ["--processes=2"], ["--processes", "2"]])
def test_processes_never_multiply(tmp_path, spelling):
    """The children get ``--processes`` however it was typed (getopt takes any unique prefix),
    so none of them starts processes of its own: two server processes, not a growing tree."""
    circle = Key()
    seen: list = []
    with twistd(["-k", circle.pubkey, *spelling, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server:
        try:
            server.wait_listening()
            server.wait_for("started server process 2")
            deadline = time.monotonic() + 60
            while server.output.count("connected to Redis") < 2:  # the child is up and serving
                assert time.monotonic() < deadline, server.output
                time.sleep(0.1)
            time.sleep(2)  # a child that spawns does so as soon as it listens, before this
            seen = _descendants(server.proc.pid)
            servers = [p for p in seen if "redis-server" not in " ".join(p.cmdline())]
            assert len(servers) == 1, [p.cmdline() for p in servers]
            assert servers[0].children() == []
            assert server.output.count("started server process") == 1, server.output
            assert "--processes=1" in servers[0].cmdline()
        finally:
            seen += _descendants(server.proc.pid)
            server.stop()
            for process in seen:  # whatever a broken build left behind
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass


def test_child_argv_uses_full_names_and_never_spawns():
    from circles.server_tap import Options, child_argv
    argv = ["-kAB", "--proc", "3", "--auth", "--allowed-o", "https://a,https://b", "-p", "0", "--interface=",
            "--processes=4"]
    assert child_argv(Options(), argv) == ["--circle=AB", "--auth", "--allowed-origins=https://a,https://b",
                                           "--port=0", "--interface=", "--processes=1"]


def test_a_killed_server_process_is_started_again(tmp_path):
    """kill -9 one of the N (the OOM killer's choice): the first process starts another in its
    place, so N serve again, and stopping still leaves nothing."""
    circle = Key()
    seen: list = []
    with twistd(["-k", circle.pubkey, "--processes", "3", "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server:
        try:
            port = server.wait_listening()
            deadline = time.monotonic() + 60
            while server.output.count("connected to Redis") < 3:
                assert time.monotonic() < deadline, server.output
                time.sleep(0.1)
            before = [p for p in _descendants(server.proc.pid) if "redis-server" not in " ".join(p.cmdline())]
            assert len(before) == 2
            before[0].kill()
            while server.output.count("connected to Redis") < 4:  # the new one serves
                assert time.monotonic() < deadline, server.output
                time.sleep(0.1)
            seen = _descendants(server.proc.pid)
            after = [p for p in seen if "redis-server" not in " ".join(p.cmdline())]
            assert len(after) == 2 and before[0] not in after and before[1] in after
            assert server.output.count("started server process") == 3
            assert "server process 2 exited (killed by signal 9) while serving" in server.output \
                or "server process 3 exited (killed by signal 9) while serving" in server.output
            with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
                assert request(ws, "whoami")["result"] is not None
        finally:
            seen += _descendants(server.proc.pid)
            assert server.stop() in (0, -signal.SIGTERM)
    for process in seen:
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE



def _wait_serving(server, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.output.count("connected to Redis") < count:
        assert time.monotonic() < deadline and server.proc.poll() is None, server.output
        time.sleep(0.1)


@contextlib.contextmanager
def _serving(tmp_path, circle: Key, processes: int):
    """``twistd circles --processes N`` on a free port, every process connected to Redis: (server, port)."""
    with twistd(["-k", circle.pubkey, "--processes", str(processes), "--port", "0", "--interface", "127.0.0.1",
                 "--state-dir", str(tmp_path / "state")], tmp_path) as server:
        port = server.wait_listening()
        _wait_serving(server, processes)
        yield server, port


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _sample(exposition: bytes, name: str, labels: dict | None = None) -> float | None:
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return sample.value
    return None


@pytest.mark.parametrize("form", ["text", "json"])
def test_every_process_logs_to_the_one_log_with_pid_and_process(tmp_path, form):
    """The others used to write to the first one's standard output, whatever --logfile said
    (under twistd without -n: lost). Now the first writes their events to its own log: every
    line names its process and pid, and no line is cut into another."""
    circle = Key()
    logfile = tmp_path / "server.log"
    options = ("--logger", "circles.common.logs.json_observer") if form == "json" else (f"--logfile={logfile}",)
    with twistd(["-k", circle.pubkey, "--processes", "2", "--port", "0", "--interface", "127.0.0.1",
                 "--state-dir", str(tmp_path / "state")], tmp_path, options=options) as server:
        text = (lambda: logfile.read_text() if logfile.exists() else "") if form == "text" else (lambda: server.output)
        assert eventually_true(lambda: text().count("connected to Redis") >= 2), text()
        pids = {p.pid for p in _server_processes(server.proc.pid)}
        assert server.stop() in (0, -signal.SIGTERM)
    lines = text().splitlines()
    seen = set()
    if form == "text":
        lines = [line for line in lines if not line.startswith("\t")]  # a traceback's continuation
        for line in lines:
            match = re.match(r"\S+ \[[^\]]* process=(\d) pid=(\d+)\] ", line)
            assert match, line
            seen.add((int(match.group(1)), int(match.group(2))))
    else:
        for line in lines:
            event = json.loads(line)
            seen.add((event["process"], event["pid"]))
    assert {process for process, _ in seen} == {1, 2}, seen
    assert {pid for _, pid in seen} == pids  # the pid of each process, not of the first
    assert text().count("circles starting on") == 2 and text().count("Server Shut Down.") == 2
    assert "Traceback" not in text()


def test_a_daemon_logs_every_process_to_its_logfile(tmp_path):
    """Under twistd without -n, the daemon's standard output is /dev/null: the others' events
    reach its --logfile through it all the same, each line naming its process and pid, and
    SIGTERM to the daemon stops every process."""
    circle = Key()
    logfile, pidfile = tmp_path / "circles.log", tmp_path / "circles.pid"
    started = subprocess.run([TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "circles", "-k", circle.pubkey,
                              "--processes", "2", "--port", "0", "--interface", "127.0.0.1",
                              "--state-dir", str(tmp_path / "state")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started
    daemon = int(pidfile.read_text())
    seen = _descendants(daemon)

    def text() -> str:
        return logfile.read_text() if logfile.exists() else ""

    try:
        assert eventually_true(lambda: text().count("connected to Redis") >= 2), text()
        seen += _descendants(daemon)
        servers = {daemon, *(p.pid for p in _server_processes(daemon)[1:])}
        assert len(servers) == 2
    finally:
        os.kill(daemon, signal.SIGTERM)
    assert eventually_true(lambda: not alive(daemon) and not any(alive(p.pid) for p in seen)), text()
    seen_in_log = set()
    for line in text().splitlines():
        if line.startswith("\t"):  # a traceback's continuation
            continue
        match = re.match(r"\S+ \[[^\]]* process=(\d) pid=(\d+)\] ", line)
        assert match, line
        seen_in_log.add((int(match.group(1)), int(match.group(2))))
    assert {(2, pid) for pid in servers - {daemon}} <= seen_in_log and (1, daemon) in seen_in_log, seen_in_log
    assert text().count("circles starting on") == 2 and text().count("Server Shut Down.") == 2
    assert "Traceback" not in text()


def test_one_scrape_counts_every_process(tmp_path):
    """Each process answered /metrics with its own share; one scrape now reports them all."""
    circle = Key()
    with _serving(tmp_path, circle, 2) as (server, port):
        processes = _server_processes(server.proc.pid)
        clients = [connect(f"ws://127.0.0.1:{port}/{circle.pubkey}").__enter__() for _ in range(40)]
        try:
            for ws in clients:
                assert request(ws, "whoami")["result"]["circle"] == circle.pubkey
            held = [_established(p, port) for p in processes]
            assert sum(held) == 40 and all(held), held  # both processes hold some
            time.sleep(1.1)  # views older than circles.server.processes.siblings.FRESH are asked again
            for _ in range(6):  # whichever process each scrape reaches
                status, body = _get(port, "/metrics")
                assert status == 200
                assert _sample(body, "circles_connections_open") == 40, body.decode()
                assert _sample(body, "circles_requests_total", {"method": "whoami", "outcome": "ok"}) == 40
                shares = [_sample(body, "circles_process_connections_open", {"process": str(n)}) for n in (1, 2)]
                assert sorted(shares) == sorted(held), (shares, held)
                assert [_sample(body, "circles_process_up", {"process": str(n)}) for n in (1, 2)] == [1, 1]
                assert all(_sample(body, "circles_process_resident_memory_bytes", {"process": str(n)}) > 10 ** 6
                           for n in (1, 2))
        finally:
            for ws in clients:
                ws.close()


def test_a_killed_process_makes_the_server_unready_until_it_is_back(tmp_path):
    circle = Key()
    with _serving(tmp_path, circle, 2) as (server, port):
        assert eventually_true(lambda: _get(port, "/ready")[0] == 200)
        status, body = _get(port, "/ready")
        assert json.loads(body) == {"status": "ready", "processes": {"1": "ready", "2": "ready"}}
        child = _server_processes(server.proc.pid)[1]
        child.kill()
        # The first process says so, reports it until the new one serves, then is ready again.
        answers = []
        deadline = time.monotonic() + 60
        while not (answers and answers[-1][0] == 200 and any(code == 503 for code, _ in answers)):
            assert time.monotonic() < deadline, (answers, server.output)
            try:
                status, body = _get(port, "/ready")
            except (ConnectionError, urllib.error.URLError):
                # Reset: queued on the killed one's socket (SO_REUSEPORT: the kernel drops its queue).
                continue
            answers.append((status, json.loads(body)))
            time.sleep(0.1)
        unready = [body for code, body in answers if code == 503]
        assert unready[0]["reason"] in ("server process 2: not running", "server process 2: not answering",
                                        "server process 2: script backend unavailable")
        assert unready[0]["processes"]["1"] == "ready" and unready[0]["processes"]["2"] != "ready"
        assert answers[-1][1] == {"status": "ready", "processes": {"1": "ready", "2": "ready"}}
        assert "server process 2 exited (killed by signal 9) while serving; starting it again in 1s" in server.output
        assert "started server process 2 again" in server.output


@pytest.mark.parametrize("processes", [2, 3])
def test_a_burst_of_connections_is_dealt_evenly(tmp_path, processes):
    """Connections opened all at once go to each process in turns, as connections opened one
    after another do: no process leads another by a turn (before: 1/49, 4/46, 17/33 over
    bursts of 50, the process that had waited taking all that was queued).

    Two bursts of three: a process that the machine leaves without the CPU for 10 ms (this
    suite runs tests side by side) counts as busy, and the others take its share, as they
    should; that may spoil one burst, not most."""
    circle = Key()
    with _serving(tmp_path, circle, processes) as (server, port):
        members = _server_processes(server.proc.pid)
        count = 12 * processes
        splits = []
        for _ in range(3):
            sockets = open_at_once(port, count)
            try:
                assert eventually_true(lambda: sum(_established(p, port) for p in members) == count)
                splits.append(sorted(_established(p, port) for p in members))
            finally:
                for sock in sockets:
                    sock.close()
            assert eventually_true(lambda: sum(_established(p, port) for p in members) == 0)
        assert sum(held[-1] - held[0] < TURN for held in splits) >= 2, splits


def test_a_stopped_process_delays_a_burst_only_briefly(tmp_path):
    """SIGSTOP one of two: the other one, having waited its turn in vain, takes the whole burst."""
    circle = Key()
    with _serving(tmp_path, circle, 2) as (server, port):
        first, child = _server_processes(server.proc.pid)
        child.suspend()
        sockets = open_at_once(port, 20)
        try:
            assert eventually_true(lambda: _established(first, port) == 20)
        finally:
            child.resume()
            for sock in sockets:
                sock.close()


def test_a_hung_process_does_not_hang_the_scrape(tmp_path):
    """SIGSTOP one of them: a scrape the other one takes answers after circles.server.processes.siblings.ASK_TIMEOUT
    with the stopped one reported down (one the stopped one takes waits, as it would alone)."""
    circle = Key()
    with _serving(tmp_path, circle, 2) as (server, port):
        child = _server_processes(server.proc.pid)[1]
        child.suspend()
        try:
            answered = []
            for _ in range(12):
                try:  # a scrape that waited on the stopped process would time out here
                    answered.append(_get(port, "/metrics", timeout=6))
                except OSError:  # the stopped one took it
                    continue
                if len(answered) == 2:
                    break
            assert answered, "every scrape reached the stopped process"
            for status, body in answered:
                assert status == 200
                assert _sample(body, "circles_process_up", {"process": "2"}) == 0
        finally:
            child.resume()


def test_sigterm_drains_every_process_together(tmp_path):
    """SIGTERM to the first process reaches the others: each answers /ready 503 at once and keeps
    accepting for --drain-grace, all in the same seconds (not one grace after another), then all
    exit."""
    circle = Key()
    with twistd(["-k", circle.pubkey, "--processes", "2", "--port", "0", "--interface", "127.0.0.1",
                 "--state-dir", str(tmp_path / "state"), "--drain-grace", "2"], tmp_path) as server:
        port = server.wait_listening()
        _wait_serving(server, 2)
        assert eventually_true(lambda: _get(port, "/ready")[0] == 200)  # a balancer watches: every process
        stopping = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert eventually_true(lambda: server.output.count("still accepting for 2s (--drain-grace)") == 2, 10), \
            server.output
        answers = set()
        while time.monotonic() - stopping < 1.5:  # within the grace: whichever process takes it, it serves
            answers.add(_get(port, "/ready")[0])
            assert _get(port, "/health")[0] == 200
            time.sleep(0.05)
        assert answers == {503}
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
        # One grace, shared: both began it before either ended it.
        lines = [line for line in server.output.splitlines() if "--drain-grace" in line or "no longer accepting" in line]
        assert ["no longer accepting" in line for line in lines] == [False, False, True, True], lines


def _counters(exposition: bytes) -> dict:
    """Every counting sample (a counter's ``_total``, a histogram's buckets, ``_count``, ``_sum``)
    by (name, labels)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(exposition.decode())
            if family.type in ("counter", "histogram", "summary")
            for sample in family.samples}


class _Scrapes:
    """Scrapes the server's port (whichever process takes each), checking that no counting sample
    ever goes down or disappears from one answered scrape to the next."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.last: dict = {}
        self.answered: list = []

    def scrape(self, timeout: float = 10) -> bytes | None:
        """One scrape, checked; None if it was not answered (reset with a killed process's queue,
        or taken by a stopped one)."""
        try:
            status, body = _get(self.port, "/metrics", timeout=timeout)
        except OSError:
            return None
        assert status == 200, body
        counters = _counters(body)
        lower = {key: (value, counters.get(key)) for key, value in self.last.items()
                 if counters.get(key) is None or counters[key] < value}
        assert not lower, (lower, body.decode())
        self.last = counters
        self.answered.append(body)
        return body

    def until(self, predicate, timeout: float = 60, scrape_timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            body = self.scrape(scrape_timeout)
            if body is not None and predicate(body):
                return body
            assert time.monotonic() < deadline, self.answered[-1:]
            time.sleep(0.1)


def _whoami_ok(body: bytes) -> float | None:
    return _sample(body, "circles_requests_total", {"method": "whoami", "outcome": "ok"})


def _up(body: bytes, number: int) -> float | None:
    return _sample(body, "circles_process_up", {"process": str(number)})


def _whoami_on_both(port: int, circle: Key, processes: list, count: int = 40) -> None:
    """``count`` whoami requests, over connections both processes hold some of."""
    clients = [connect(f"ws://127.0.0.1:{port}/{circle.pubkey}").__enter__() for _ in range(count)]
    try:
        for ws in clients:
            assert request(ws, "whoami")["result"]["circle"] == circle.pubkey
        held = [_established(p, port) for p in processes]
        assert sum(held) == count and all(held), held
    finally:
        for ws in clients:
            ws.close()


def test_counters_never_go_down_across_a_killed_and_restarted_process(tmp_path):
    """kill -9 one of them: its share of every counter used to vanish from the sums (440
    requests, then 206), for good once it was started again. Now no counting sample goes down in
    any scrape, while it is dead, once it is back, and after; and nothing is counted twice."""
    circle = Key()
    with _serving(tmp_path, circle, 2) as (server, port):
        processes = _server_processes(server.proc.pid)
        _whoami_on_both(port, circle, processes)
        scrapes = _Scrapes(port)
        scrapes.until(lambda body: _whoami_ok(body) == 40)
        processes[1].kill()
        scrapes.until(lambda body: _up(body, 2) == 0)  # dead, or started again and not serving yet
        back = scrapes.until(lambda body: _up(body, 2) == 1)
        assert _whoami_ok(back) == 40
        assert "started server process 2 again" in server.output
        processes = _server_processes(server.proc.pid)
        _whoami_on_both(port, circle, processes, 20)
        scrapes.until(lambda body: _whoami_ok(body) == 60)  # the new one's too, added to the old one's
        for _ in range(10):
            assert _whoami_ok(scrapes.until(lambda body: True)) == 60  # whichever process answers, once only
        assert all(40 <= _whoami_ok(body) <= 60 for body in scrapes.answered)


def test_counters_never_go_down_while_a_process_hangs(tmp_path):
    """SIGSTOP one of them, then SIGCONT: while it does not answer, its last counts stay in the
    sums; once it answers again, its live counts (never lower) take their place."""
    circle = Key()
    with _serving(tmp_path, circle, 2) as (server, port):
        processes = _server_processes(server.proc.pid)
        _whoami_on_both(port, circle, processes)
        scrapes = _Scrapes(port)
        scrapes.until(lambda body: _whoami_ok(body) == 40)
        processes[1].suspend()
        try:
            hung = []
            while len(hung) < 3:  # a scrape the stopped one takes is not answered
                hung.append(scrapes.until(lambda body: _up(body, 2) == 0, scrape_timeout=6))
            assert all(_whoami_ok(body) == 40 for body in hung)
        finally:
            processes[1].resume()
        scrapes.until(lambda body: _up(body, 2) == 1)
        _whoami_on_both(port, circle, processes, 20)
        scrapes.until(lambda body: _whoami_ok(body) == 60)
        for _ in range(10):
            assert _whoami_ok(scrapes.until(lambda body: True)) == 60
        assert "started server process 2 again" not in server.output
