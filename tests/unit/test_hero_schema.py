"""The hero key schema (circles/backend/hero.py), the job schemas' steps, and the options that
choose a worker protocol on both plugins."""

import json
import re
import uuid

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from circles import server_tap
from circles.backend import worker_protocols
from circles.backend.hero import HERO
from circles.backend.job_dispatch import JobScriptRunner, with_notifications
from circles.backend.job_schema import Job, JobSchema, iso_time, json_array, parse_iso_time
from circles.server.config import Config
from circles.worker import tap as worker_tap
from circles.worker.job_worker import JobWorker

CIRCLE = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
CALLER = "02" + "ab" * 32
#: docs/worker-protocol.md, "What hero documents": every field of the job hash.
DOCUMENTED = {"id", "caller_id", "worker_id", "context_id", "script", "timeout", "retries", "concurrent", "log_path",
              "created_at", "updated_at", "status", "env_vars", "prerequisites", "dependents", "output", "error",
              "dependencies"}
#: What the worker writes, and what we leave out (optional, or of no documented meaning).
NOT_WRITTEN_BY_THE_DISPATCHER = {"output", "error", "log_path", "dependencies"}


def job(**overrides) -> Job:
    values = {"id": str(uuid.uuid4()), "circle": CIRCLE, "caller": CALLER, "script": "40 + 2", "timeout": 7.5,
              "source": "ws", "created_at": 1767322245.678}
    values.update(overrides)
    return Job(**values)


def test_the_keys_are_heros():
    assert HERO.job_key("j") == "hero:job:j"
    assert HERO.queue_key(CIRCLE) == f"hero:work_queue:{CIRCLE}"
    assert HERO.stop_key(CIRCLE) == f"hero:stop_queue:{CIRCLE}"
    assert HERO.reply_key("j") == "hero:reply:j"
    assert (HERO.queued, HERO.running, HERO.finished, HERO.failed) == ("dispatched", "started", "finished", "error")


def test_a_job_hash_has_every_documented_field_the_dispatcher_writes():
    play = job()
    fields = HERO.job_fields(play)
    assert set(fields) == DOCUMENTED - NOT_WRITTEN_BY_THE_DISPATCHER
    assert all(isinstance(value, str) for value in fields.values())
    assert uuid.UUID(fields["id"]).version == 4 and fields["id"] == play.id
    assert (fields["caller_id"], fields["worker_id"], fields["context_id"]) == (CALLER, CIRCLE, CIRCLE)
    assert (fields["script"], fields["status"], fields["retries"], fields["concurrent"]) == \
        ("40 + 2", "dispatched", "0", "false")
    assert fields["created_at"] == fields["updated_at"] == "2026-01-02T02:50:45.678Z"
    assert json.loads(fields["env_vars"]) == {"CIRCLES_SOURCE": "ws"}
    assert json_array(fields["prerequisites"]) == json_array(fields["dependents"]) == []


@pytest.mark.parametrize("seconds, written", [(0.2, "1"), (1.0, "1"), (7.5, "8"), (30.0, "30"), (86400.0, "86400")])
def test_the_timeout_is_whole_seconds_rounded_up(seconds, written):
    assert HERO.job_fields(job(timeout=seconds))["timeout"] == written


def test_a_webhook_events_data_travels_in_env_vars():
    body = '{"id": "evt_1", "data": {"object": "\\u00e9"}}'
    fields = HERO.job_fields(job(caller="", source="webhook:stripe", data=body, timeout=86400))
    assert json.loads(fields["env_vars"]) == {"CIRCLES_SOURCE": "webhook:stripe", "CIRCLES_DATA": body}
    assert fields["caller_id"] == ""


def test_a_job_reads_back_as_written():
    written = job(data='{"a": 1}', source="webhook:idenfy", timeout=12)
    read = HERO.read_job("ignored", HERO.job_fields(written))
    assert read == Job(id=written.id, circle=CIRCLE, caller=CALLER, script="40 + 2", timeout=12.0,
                       source="webhook:idenfy", created_at=1767322245.678, data='{"a": 1}')


def test_another_dispatchers_job_reads_with_what_it_has():
    # A Rust dispatcher's job: no env_vars of ours, a worker_id only, a timeout we cannot read.
    read = HERO.read_job("j1", {"worker_id": CIRCLE, "script": "1", "timeout": "soon", "env_vars": "[1]",
                                "created_at": "not a time"})
    assert read == Job(id="j1", circle=CIRCLE, caller="", script="1", timeout=0.0, source="hero", created_at=0.0)
    assert HERO.read_job("j2", {"env_vars": "{not json", "timeout": "inf"}).timeout == 0.0
    assert HERO.read_job("j3", {"env_vars": '{"CIRCLES_DATA": 5}'}).data is None  # not text: none


def test_iso_times():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", iso_time(0.0)) and iso_time(0.0).startswith("1970")
    assert parse_iso_time(iso_time(1767322245.678)) == pytest.approx(1767322245.678)
    assert parse_iso_time("2026-01-02T03:04:05+01:00") == parse_iso_time("2026-01-02T02:04:05Z")
    assert parse_iso_time("2026-01-02T02:04:05") == parse_iso_time("2026-01-02T02:04:05Z")  # no zone: UTC
    assert parse_iso_time("yesterday") is None


def test_the_steps_have_every_name_written_in():
    steps = HERO.steps
    texts = [steps.dispatch, steps.dispatch_once, steps.take, steps.stop, steps.sweep, steps.start, steps.finish,
             steps.stop_request, steps.statuses]
    assert not [text for text in texts if "@" in text]
    assert '"dispatched"' in steps.start and '"started"' in steps.finish
    assert HERO.steps is steps  # built once per schema


def test_a_schema_is_a_few_names_and_two_methods():
    # What adding rhailib's would take (docs/worker-protocol.md): a subclass, and a line in the registry.
    class Tiny(JobSchema):
        name = "tiny"
        queued, running, finished, failed = "pending", "processing", "completed", "error"
        has_stop_queue = False

        def job_key(self, job_id):
            return f"tiny_task:{job_id}"

    assert '"pending"' in Tiny().steps.start and '"processing"' in Tiny().steps.stop
    assert worker_protocols.NAMES == ("circles", "hero")
    assert worker_protocols.schema("hero") is HERO and worker_protocols.schema("circles") is None
    with pytest.raises(ValueError, match="'rhai' is not one of circles, hero"):
        worker_protocols.check("rhai")


@pytest.mark.parametrize("current, wanted", [("", "Khl"), ("Ex", "ExKhl"), ("Kh", "Khl"), ("Khl", None),
                                             ("AKE", None), ("lKh$", None), ("KEA", None)])
def test_notifications_are_added_to_what_is_set_never_taken_away(current, wanted):
    assert with_notifications(current) == wanted


def test_the_server_option_chooses_the_runner():
    options = server_tap.Options()
    options.parseOptions(["--redis-url", "redis://h:1/0", "--worker-protocol", "hero"])
    assert options.config.worker_protocol == "hero"
    root = server_tap.makeService(options, reactor=MemoryReactorClock())
    [service] = list(root)
    assert isinstance(service.script_runner, JobScriptRunner) and service.script_runner.schema is HERO
    with pytest.raises(usage.UsageError, match="'rhai' is not one of circles, hero"):
        server_tap.Options().parseOptions(["--redis-url", "redis://h:1/0", "--worker-protocol", "rhai"])
    with pytest.raises(ValueError):
        Config(worker_protocol="rhai")
    assert Config().worker_protocol == "circles"


@pytest.mark.parametrize("engine, kind", [(("--exec", "sh {script_file}"), JobWorker),
                                          (("--engine", "circles.worker.tiny_engine:run"), worker_tap.IsolatingJobWorker)])
def test_the_worker_option_chooses_the_worker(engine, kind):
    options = worker_tap.Options()
    options.parseOptions(["-k", CIRCLE, "--redis-url", "redis://h:1/0", *engine, "--worker-protocol", "hero"])
    worker = worker_tap.makeService(options, reactor=MemoryReactorClock())
    assert type(worker) is kind and worker.schema is HERO and worker.circles == [CIRCLE]
    with pytest.raises(usage.UsageError, match="'x' is not one of circles, hero"):
        worker_tap.Options().parseOptions(["-k", CIRCLE, "--exec", "sh {script_file}", "--worker-protocol", "x"])
