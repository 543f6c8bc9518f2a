"""What a server or a worker says about reaching Redis, as real processes with a real
redis-server: one warning with a readable address (no password) and what to check, then quiet
retries, and a line when connected; nothing of Twisted's retry machinery at ``info``."""

import re
import subprocess
import time
import urllib.error
import urllib.request

from devtools.redis_server import REDIS_SERVER, ReplicatedRedis, free_port

from ..support import Key, twistd

#: A server on a free port, stopping at once (no load balancer watches its /ready to wait for).
LISTEN = ["--port", "0", "--interface", "127.0.0.1", "--drain-grace", "0"]

#: What an operator should not read at info about Redis: Twisted's retries, endpoints' reprs,
#: refusals, the private Redis's readiness probes. (Other factories' "Starting factory" lines are
#: the logs' business, not this test's.)
NOISE = re.compile(r"Scheduling retry|ClientEndpoint|HostnameEndpoint|Connection was refused|OneShotFactory"
                   r"|Discarding dead connection|\] Redis error: could not auth"
                   r"|Traceback|^(?!.*(Starting|Stopping) factory).*object at 0x", re.MULTILINE)


def ready_status(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def ready_within(port: int, seconds: float) -> int:
    """``/ready``'s status once it is 200, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while ready_status(port) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    return ready_status(port)


def wait_a_few_retries() -> None:
    time.sleep(5)  # retries back off to one every 2 s: several have failed by then


def start_redis(tmp_path, port: int, password: str) -> subprocess.Popen:
    return subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(tmp_path), "--requirepass", password],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_a_server_that_cannot_reach_its_redis_says_so_once(tmp_path):
    redis_port = free_port()  # nothing there yet
    url = f"redis://:hunter2@127.0.0.1:{redis_port}/0"
    with twistd([*LISTEN, "--redis-url", url], tmp_path) as server:
        port = server.wait_listening()
        server.wait_for("cannot reach Redis")
        wait_a_few_retries()
        assert ready_status(port) == 503
        warnings = [line for line in server.lines if "cannot reach Redis" in line]
        assert len(warnings) == 1
        assert "#warn]" in warnings[0]
        assert f"cannot reach Redis at redis://127.0.0.1:{redis_port}/0: Connection refused; " in warnings[0]
        assert "--redis-url" in warnings[0]
        redis = start_redis(tmp_path, redis_port, "hunter2")
        try:
            server.wait_for(f"connected to Redis at redis://127.0.0.1:{redis_port}/0")
            assert ready_within(port, 30) == 200
        finally:
            stop(redis)
    assert not NOISE.search(server.output), server.output
    assert "hunter2" not in server.output


def test_a_worker_before_its_server_says_which_state_dir_then_connects(tmp_path):
    circle = Key()
    state = tmp_path / "state"
    socket = state / "redis.sock"
    with twistd(["-k", circle.pubkey, "--exec", "sh {script_file}", "--state-dir", str(state)], tmp_path,
                plugin="circles-worker") as worker:
        worker.wait_for("cannot reach Redis")
        wait_a_few_retries()
        warnings = [line for line in worker.lines if "cannot reach Redis" in line]
        assert len(warnings) == 1, worker.output
        assert f"cannot reach Redis at unix://{socket}: No such file or directory; " \
               f"is a circles server running with --state-dir {state}?" in warnings[0]
        # The server comes: its private Redis starts (quietly) and the worker connects.
        with twistd([*LISTEN, "-k", circle.pubkey, "--state-dir", str(state)],
                    tmp_path) as server:
            server.wait_for(f"connected to Redis at unix://{socket}")
            worker.wait_for(f"connected to Redis at unix://{socket}, waiting for tasks")
    assert not NOISE.search(worker.output), worker.output
    assert not NOISE.search(server.output), server.output
    assert "cannot reach" not in server.output  # its own Redis starting is no news


def test_retries_are_there_at_debug(tmp_path):
    """Quiet at info, not gone: --log-level debug shows each retry, naming the address."""
    port = free_port()
    with twistd([*LISTEN, "--redis-url", f"redis://127.0.0.1:{port}/0",
                 "--log-level", "debug"], tmp_path) as server:
        server.wait_for(f"to connect redis://127.0.0.1:{port}/0 in")
    assert "object at 0x" not in "".join(line for line in server.lines if "Scheduling retry" in line)


def test_a_wrong_password_is_one_error_line(tmp_path):
    redis_port = free_port()
    redis = start_redis(tmp_path, redis_port, "right")
    try:
        with twistd([*LISTEN, "--redis-url",
                     f"redis://:wrong@127.0.0.1:{redis_port}/0"], tmp_path) as server:
            port = server.wait_listening()
            server.wait_for("refused the connection")
            wait_a_few_retries()
            assert ready_status(port) == 503
    finally:
        stop(redis)
    errors = [line for line in server.lines if "refused the connection" in line]
    assert len(errors) == 1 and "#error]" in errors[0]
    assert f"Redis at redis://127.0.0.1:{redis_port}/0 refused the connection (" in errors[0]
    assert "check the credentials and database of --redis-url, then restart (not retrying)" in errors[0]
    assert "wrong" not in server.output.replace("WRONGPASS", "")
    assert not NOISE.search(server.output), server.output


def test_a_server_whose_sentinels_are_not_there_yet_says_so_once_then_follows_them(tmp_path):
    redis = ReplicatedRedis(str(tmp_path / "redis"))  # its ports are chosen, nothing runs yet
    url = redis.url.replace("redis+sentinel://", "redis+sentinel://:hunter2@")
    where = redis.url.replace("redis+sentinel://", "")
    try:
        with twistd([*LISTEN, "--redis-url", url], tmp_path) as server:
            port = server.wait_listening()
            server.wait_for("cannot reach Redis")
            assert ready_status(port) == 503
            [warning] = [line for line in server.lines if "cannot reach Redis" in line]
            assert f"cannot reach Redis at redis+sentinel://{where}: no Sentinel of circles answers; check that " \
                   f"its Sentinels run and know a primary named 'circles'" in warning
            for node in redis.nodes:
                node.args += ["--requirepass", "hunter2", "--masterauth", "hunter2"]
            for sentinel in redis.sentinels:
                with open(sentinel.config, "a") as f:
                    f.write("sentinel auth-pass circles hunter2\n")
            redis.start_with_password("hunter2")
            primary = redis.nodes[0].port
            server.wait_for(f"connected to Redis at redis+sentinel://{where} (primary 127.0.0.1:{primary})")
            assert ready_within(port, 30) == 200
    finally:
        redis.stop()
    assert not NOISE.search(server.output), server.output
    assert "hunter2" not in server.output
