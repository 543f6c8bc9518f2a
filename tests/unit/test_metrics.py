"""circles.server.metrics: the counts kept as plain numbers read as prometheus_client's own."""

from __future__ import annotations

import re

import prometheus_client.metrics
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from twisted.internet.task import Clock

from circles.server.metrics import CountedCounter, CountedHistogram, Metrics

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DOC = "what is counted"

# A count of a request (method, outcome; an error code as a number or as text, as callers give
# it) or an observation: bounds exactly, around them, zero, past the last, negative.
events = st.lists(
    st.tuples(st.just("count"), st.sampled_from(["play", "whoami", "unknown", "é"]),
              st.sampled_from(["ok", "cancelled", -32005, "-32005", -32600]))
    | st.tuples(st.just("observe"), st.sampled_from(BUCKETS) | st.floats(-1, 100, allow_nan=False)
                | st.sampled_from([0.0, 1e-9, 60.000001, 1e6])),
    max_size=60)


def _ours(events: list, clock: Clock) -> bytes:
    registry = CollectorRegistry()
    counter = CountedCounter(clock, "circles_requests", DOC, ["method", "outcome"])
    histogram = CountedHistogram(clock, "circles_play_seconds", DOC, BUCKETS)
    registry.register(counter)
    registry.register(histogram)
    for kind, *args in events:
        if kind == "count":
            counter.inc(tuple(args))
        else:
            histogram.observe(args[0])
    return generate_latest(registry)


def _prometheus_clients(events: list) -> bytes:
    registry = CollectorRegistry()
    counter = Counter("circles_requests", DOC, ["method", "outcome"], registry=registry)
    histogram = Histogram("circles_play_seconds", DOC, buckets=BUCKETS, registry=registry)
    for kind, *args in events:
        if kind == "count":
            counter.labels(*map(str, args)).inc()
        else:
            histogram.observe(args[0])
    return generate_latest(registry)


def _without_times(exposition: bytes) -> str:
    """The exposition with each ``_created`` time replaced by a mark: the rest must be the same."""
    return re.sub(r"(?m)^(\w+_created(?:\{[^}]*\})?) \S+$", r"\1 T", exposition.decode())


@settings(max_examples=300, deadline=None)
@given(events)
def test_the_exposition_is_prometheus_clients_own_for_the_same_counts(events):
    clock = Clock()
    clock.advance(1_765_000_000.25)
    ours, theirs = _ours(events, clock), _prometheus_clients(events)
    assert _without_times(ours) == _without_times(theirs)
    created = re.findall(r"(?m)^\w+_created(?:\{[^}]*\})? (\S+)$", ours.decode())
    assert created and set(created) == {"1.76500000025e+09"}  # the clock's time, for every series


def test_a_series_is_created_when_first_counted_and_an_outcome_as_number_or_text_is_one_series():
    clock = Clock()
    counter = CountedCounter(clock, "circles_requests", DOC, ["method", "outcome"])
    clock.advance(10)
    counter.inc(("play", -32005))
    clock.advance(5)
    counter.inc(("play", "-32005"))
    counter.inc(("play", "ok"))
    [family] = counter.collect()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    assert samples == {
        ("circles_requests_total", (("method", "play"), ("outcome", "-32005"))): 2,
        ("circles_requests_created", (("method", "play"), ("outcome", "-32005"))): 10.0,
        ("circles_requests_total", (("method", "play"), ("outcome", "ok"))): 1,
        ("circles_requests_created", (("method", "play"), ("outcome", "ok"))): 15.0,
    }


def test_created_series_go_where_prometheus_client_turns_them_off(monkeypatch):
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)
    events = [("count", "play", "ok"), ("observe", 0.02)]
    ours = _ours(events, Clock())
    assert b"_created" not in ours
    assert ours == _prometheus_clients(events)


@pytest.mark.parametrize("method, outcome, label", [("play", "ok", "play"), ("nosuch" * 1000, "ok", "unknown"),
                                                     (None, -32600, "invalid")])
def test_requests_are_counted_under_the_api_s_method_names_only(method, outcome, label):
    metrics = Metrics(Clock())
    metrics.label_methods(["play", "whoami"])
    metrics.request(method, outcome)
    metrics.request(method, outcome)
    assert f'circles_requests_total{{method="{label}",outcome="{outcome}"}} 2.0' in metrics.exposition().decode()
