"""The twistd plugins' options: every default written once (Config's, Worker's), the Redis they
name chosen by one piece for both, and ``--webhook-max-body`` still accepted."""

import inspect
import pathlib
import re

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from circles import server_tap
from circles.backend import tasks
from circles.backend.dispatch import RedisScriptRunner
from circles.backend.embedded import DEFAULT_STATE_DIR
from circles.backend.redis_options import REDIS_URL_ENV, choose_redis
from circles.backend.redis_url import InvalidRedisURL, RedisAddress
from circles.server.config import DEFAULT_PLAIN_PORT, DEFAULT_TLS_PORT, Config
from circles.server.providers import secrets as webhook_secrets
from circles.worker import tap as worker_tap
from circles.worker.service import Worker

from ..inmemory import captured_log

URL = "redis://h:1/0"


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in (REDIS_URL_ENV, webhook_secrets.STRIPE_ENV, webhook_secrets.IDENFY_ENV):
        monkeypatch.delenv(name, raising=False)


def server_options(*argv) -> server_tap.Options:
    options = server_tap.Options()
    options.parseOptions(list(argv))
    return options


def help_text(options: usage.Options) -> str:
    return " ".join(str(options).split())


@pytest.mark.parametrize("option, field", sorted(server_tap.CONFIG_FIELDS.items()))
def test_every_server_option_defaults_to_its_config_field(option, field):
    options = server_tap.Options()
    assert option in options.synonyms
    assert server_tap._config_value(options, option) == attrs.fields_dict(Config)[field].default


def test_options_left_out_make_the_default_config():
    # Each field, the ones the options set in other ways too: only what the command line
    # decides otherwise differs (where the private Redis lives).
    assert server_options("--redis-url", URL).config == Config(redis_url=URL, state_dir=DEFAULT_STATE_DIR)


def test_help_quotes_the_defaults_in_use():
    text = help_text(server_tap.Options())
    assert f"(default {DEFAULT_PLAIN_PORT}, or {DEFAULT_TLS_PORT} with TLS)" in text
    config = Config()
    for option, field in server_tap.CONFIG_FIELDS.items():
        quoted = re.search(rf"--{re.escape(option)}= (?:(?! --[a-z-]+=).)*?\[default: ([^\]]*)\]", text)
        default = getattr(config, field)
        if default is None or isinstance(default, bool):
            assert quoted is None, option
        else:
            shown = ",".join(default) if isinstance(default, tuple) else str(default)
            assert quoted is not None and quoted.group(1) == shown, option
    # A tuple default is shown as it is given, not as Python writes a tuple.
    assert "[default: *]" in text and "('" not in text


@pytest.mark.parametrize("option, parameter", sorted(worker_tap.WORKER_PARAMETERS.items()))
def test_every_worker_option_defaults_to_the_workers(option, parameter):
    default = inspect.signature(Worker).parameters[parameter].default
    assert worker_tap.Options()[option] == worker_tap.OWN_DEFAULTS.get(option, default)


def test_a_command_line_worker_runs_four_scripts_at_a_time_an_embedded_one_one():
    assert worker_tap.Options()["concurrency"] == 4
    assert inspect.signature(Worker).parameters["concurrency"].default == 1


def test_the_redis_prefix_is_written_once():
    assert tasks.DEFAULT_PREFIX == "circles:"
    defaults = {server_tap.Options()["redis-prefix"], worker_tap.Options()["redis-prefix"], Config().redis_prefix,
                inspect.signature(Worker).parameters["prefix"].default,
                inspect.signature(RedisScriptRunner).parameters["prefix"].default}
    assert defaults == {tasks.DEFAULT_PREFIX}
    for options in (server_tap.Options(), worker_tap.Options()):
        assert f"[default: {tasks.DEFAULT_PREFIX}]" in help_text(options)
    # Nowhere else in the package's code or docstrings is it spelled out.
    package = pathlib.Path(server_tap.__file__).parent
    spelled = [path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if re.search(r"""["'`]circles:["'`]""", path.read_text(encoding="utf-8"))]
    assert spelled == ["backend/tasks.py"]


def test_max_request_body_and_its_former_name():
    assert server_options("--redis-url", URL, "--max-request-body", "5000").config.max_request_body == 5000
    options = server_options("--redis-url", URL, "--webhook-max-body", "5000")
    assert options.config.max_request_body == 5000 and options.deprecated == {"webhook-max-body"}
    with captured_log() as events:
        server_tap.makeService(options, reactor=MemoryReactorClock())
    warnings = [e for e in events if "deprecated" in e.get("log_format", "")]
    assert [(e["former"], e["option"]) for e in warnings] == [("webhook-max-body", "max-request-body")]
    # the other processes of --processes get the current name
    assert server_tap.child_argv(options, ["--webhook-max-body", "5000", "--processes", "2"]) == \
        ["--max-request-body=5000", "--processes=1"]
    # the same conversion and the same words for a bad value, whichever name
    for name in ("--max-request-body", "--webhook-max-body"):
        for bad in ("0", "x"):
            with pytest.raises(usage.UsageError) as e:
                server_options("--redis-url", URL, name, bad)
            with pytest.raises(usage.UsageError) as expected:
                server_options("--redis-url", URL, "--max-request-body", bad)
            assert str(e.value) == str(expected.value)
    assert "deprecated synonym of --max-request-body" in help_text(server_tap.Options())
    assert not server_options("--redis-url", URL).deprecated


def test_choose_redis(tmp_path, monkeypatch):
    reactor = MemoryReactorClock()
    private = choose_redis({"redis-url": None, "state-dir": str(tmp_path)}, reactor)
    assert private.private and private.address == RedisAddress(path=str(tmp_path / "redis.sock"))
    given = choose_redis({"redis-url": "redis://:pw@h:1/2", "state-dir": str(tmp_path)}, reactor)
    assert not given.private and given.address == RedisAddress(host="h", port=1, db=2, password="pw")
    assert "pw" not in repr(given)
    monkeypatch.setenv(REDIS_URL_ENV, URL)
    assert choose_redis({"redis-url": None, "state-dir": str(tmp_path)}, reactor).url == URL
    assert choose_redis({"redis-url": "redis://other", "state-dir": str(tmp_path)}, reactor).url == "redis://other"
    with pytest.raises(usage.UsageError, match="^--redis-url: unsupported scheme"):
        choose_redis({"redis-url": "http://h", "state-dir": str(tmp_path)}, reactor)
    with pytest.raises(InvalidRedisURL, match="^ssl_ca_certs: cannot read CA file"):
        choose_redis({"redis-url": f"rediss://h?ssl_ca_certs={tmp_path / 'missing.pem'}", "state-dir": "."}, reactor)


def test_each_plugin_answers_a_bad_redis_url_its_own_way(tmp_path):
    missing_ca = f"rediss://h?ssl_ca_certs={tmp_path / 'missing.pem'}"
    generator = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"  # a valid key
    worker = ("-k", generator, "--exec", "sh {script_file}")
    with pytest.raises(usage.UsageError, match="^--redis-url: unsupported scheme"):
        server_options("--redis-url", "http://h")
    with pytest.raises(usage.UsageError, match="^--redis-url: unsupported scheme"):
        worker_tap.Options().parseOptions([*worker, "--redis-url", "http://h"])
    # a CA file that cannot be used: one line from the server, a usage mistake for the worker
    with pytest.raises(SystemExit, match="^circles: --redis-url: ssl_ca_certs: cannot read CA file"):
        server_options("--redis-url", missing_ca)
    with pytest.raises(usage.UsageError, match="^--redis-url: ssl_ca_certs: cannot read CA file"):
        worker_tap.Options().parseOptions([*worker, "--redis-url", missing_ca])
