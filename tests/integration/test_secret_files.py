"""The Redis URL (with its password) from a file: ``--redis-url-file`` or
``$CIRCLES_REDIS_URL_FILE``, for both plugins, read the way the webhook secrets' files are
(:func:`circles.common.options.read_secret_file`), so that no password is on a command line."""

from __future__ import annotations

import subprocess

import psutil
import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from websockets.sync.client import connect

from circles.backend.redis_options import REDIS_URL_ENV, REDIS_URL_FILE_ENV, choose_redis
from devtools.redis_server import RedisProcess
from devtools.twistd import TWISTD

from ..support import Key, request, twistd

PASSWORD = "s3cret-redis-pw"


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in (REDIS_URL_ENV, REDIS_URL_FILE_ENV, "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


def _url_file(tmp_path, text: str):
    path = tmp_path / "redis-url"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_server_and_worker_take_the_redis_url_from_a_file(tmp_path, monkeypatch):
    redis = RedisProcess(str(tmp_path), args=["--requirepass", PASSWORD])
    redis.start_with_password(PASSWORD)
    try:
        path = _url_file(tmp_path, f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0\n")
        circle = Key()
        monkeypatch.setenv(REDIS_URL_FILE_ENV, str(path))  # the server: from the environment
        with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1"], tmp_path) as server:
            monkeypatch.delenv(REDIS_URL_FILE_ENV)
            with twistd(["-k", circle.pubkey, "--exec", "sh {script_file}", "--redis-url-file", str(path)], tmp_path,
                        plugin="circles-worker") as worker:  # the worker: the option
                port = server.wait_listening()
                server.wait_for("connected to Redis")
                worker.wait_for("waiting for tasks")
                with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}") as ws:
                    assert request(ws, "play", {"script": "echo from-a-file"})["result"] == {"output": "from-a-file"}
                command_lines = " ".join(" ".join(psutil.Process(p.proc.pid).cmdline()) for p in (server, worker))
        assert f"Redis URL from ${REDIS_URL_FILE_ENV}" in server.output
        assert "Redis URL from --redis-url-file" in worker.output
        for text in (server.output, worker.output, command_lines):
            assert PASSWORD not in text
    finally:
        redis.kill()


@pytest.mark.parametrize("plugin, extra", [("circles", []), ("circles-worker", ["--exec", "sh {script_file}"])])
@pytest.mark.parametrize("content, message", [
    (None, "cannot read {path}: No such file or directory"),
    ("redis://h:1/0\nredis://h:2/0\n", "{path} must hold one line, the Redis URL"),
    ("\n", "{path} must hold one line, the Redis URL"),
    ("x" * (65 * 1024), "{path} is larger than 64 KiB: not a secret file"),
])
def test_a_redis_url_file_that_cannot_be_used_is_one_clear_line(tmp_path, plugin, extra, content, message):
    path = tmp_path / "missing" if content is None else _url_file(tmp_path, content)
    result = subprocess.run([TWISTD, "-n", "--pidfile=", plugin, "-k", Key().pubkey, *extra,
                             "--redis-url-file", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"circles: --redis-url-file: {message.format(path=path)}" in output, output
    assert "Traceback" not in output


def test_the_option_wins_over_the_environment_and_both_options_are_refused(tmp_path, monkeypatch):
    reactor = MemoryReactorClock()
    path = _url_file(tmp_path, "redis://:pw@from-file:1/0")
    monkeypatch.setenv(REDIS_URL_ENV, "redis://from-env:1/0")
    chosen = choose_redis({"redis-url": None, "redis-url-file": str(path), "state-dir": "."}, reactor)
    assert chosen.url == "redis://:pw@from-file:1/0" and chosen.source == "--redis-url-file"
    assert f"${REDIS_URL_ENV} also set: ignored" in chosen.log_line() and "pw" not in chosen.log_line()
    # In the environment, the URL itself comes before the file.
    monkeypatch.setenv(REDIS_URL_FILE_ENV, str(path))
    assert choose_redis({"redis-url": None, "state-dir": "."}, reactor).url == "redis://from-env:1/0"
    monkeypatch.delenv(REDIS_URL_ENV)
    assert choose_redis({"redis-url": None, "state-dir": "."}, reactor).url == "redis://:pw@from-file:1/0"
    with pytest.raises(usage.UsageError, match="not both"):
        choose_redis({"redis-url": "redis://h", "redis-url-file": str(path), "state-dir": "."}, reactor)
