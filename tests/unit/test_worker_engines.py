"""The worker's engines: --engine with a Python callable, the options (--exec with real processes:
tests/integration/test_worker_engines.py)."""

from __future__ import annotations

import pytest
from twisted.internet import reactor
from twisted.python import usage

from circles.worker import tap as worker_tap
from circles.worker.engines import ExecEngine, ScriptContext, load_engine

from ..play_client import new_key, pk

CONTEXT = ScriptContext(task_id="t-1", circle="02" + "ab" * 32, caller="03" + "cd" * 32, source="ws")


def sample_engine(script, context):
    """An --engine target for the tests below."""
    return f"{context.circle}:{script.upper()}"


def test_output_before_an_error_fits_with_the_error_in_the_cap():
    from circles.worker.engines import output_before_error, output_size
    assert output_before_error("a\nb", "boom", 100) == "a\nb"
    kept = output_before_error("x" * 50 + "é" * 50 + "end", "e" * 40, 100)
    assert kept.startswith("...") and kept.endswith("end") and output_size(kept) + 40 <= 100
    assert output_before_error("anything", "e" * 100, 100) == ""
    assert output_before_error(None, "boom", 100) == output_before_error(b"bytes", "boom", 100) == ""


def test_exec_command_checks():
    with pytest.raises(ValueError, match="script_file"):
        ExecEngine("cat", reactor=reactor)
    with pytest.raises(ValueError, match="not found"):
        ExecEngine("no-such-interpreter-xyz {script_file}", reactor=reactor)


def test_load_engine():
    assert load_engine("tests.unit.test_worker_engines:sample_engine")("x", CONTEXT) == f"{CONTEXT.circle}:X"
    for bad in ["nomodule", "no_such_module_xyz:f", "tests.unit.test_worker_engines:missing",
                "tests.unit.test_worker_engines:CONTEXT"]:
        with pytest.raises(ValueError):
            load_engine(bad)


def parse(*argv) -> worker_tap.Options:
    options = worker_tap.Options()
    options.parseOptions(list(argv))
    return options


def test_worker_options(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCLES_REDIS_URL", raising=False)
    circle = pk(new_key())
    options = parse("-k", circle, "--exec", "sh {script_file}", "--state-dir", str(tmp_path), "-c", "3")
    assert options.address.path == str(tmp_path / "redis.sock")
    service = worker_tap.makeService(options)
    assert service.circles == [circle] and service.concurrency == 3
    options = parse("-k", circle, "--engine", "tests.unit.test_worker_engines:sample_engine", "--redis-url", "redis://h:1/2",
                    "--max-output", "5000")
    assert options.address.host == "h" and options.address.db == 2
    assert worker_tap.makeService(options).max_output == 5000  # --max-output caps --engine output too
    for argv in [("--exec", "sh {script_file}"),  # no circle
                 ("-k", circle),  # no engine
                 ("-k", circle, "--exec", "sh {script_file}", "--engine", "tests.unit.test_worker_engines:sample_engine"),
                 ("-k", "nothex", "--exec", "sh {script_file}"),
                 ("-k", circle, "--engine", "nomodule:f"),
                 ("-k", circle, "--exec", "sh {script_file}", "--redis-url", "http://x"),
                 ("-k", circle, "--exec", "sh {script_file}", "--redis-url",
                  f"rediss://x?ssl_ca_certs={tmp_path / 'missing.pem'}"),
                 ("-k", circle, "--exec", "sh {script_file}", "-c", "0")]:
        with pytest.raises(usage.UsageError):
            parse(*argv)


def test_prelude_option(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCLES_REDIS_URL", raising=False)
    circle = pk(new_key())
    base = ("-k", circle, "--state-dir", str(tmp_path))
    assert parse(*base, "--exec", "sh {script_file}").engine.prelude == "none"
    assert parse(*base, "--exec", "sh {script_file}", "--prelude", "rhai").engine.prelude == "rhai"
    for argv in [("--exec", "sh {script_file}", "--prelude", "lua"),
                 ("--engine", "tests.unit.test_worker_engines:sample_engine", "--prelude", "rhai")]:
        with pytest.raises(usage.UsageError, match="--prelude"):
            parse(*base, *argv)
