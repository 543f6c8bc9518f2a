"""Prometheus metrics of one server, in a registry of its own (several services may share a
process, tests among them). Served at ``GET /metrics`` or on ``--metrics-listen``.

Under ``--processes N`` a scrape reaches any one of the processes, and reports the whole server:
the first process asks the others for theirs (:mod:`circles.server.processes.siblings`) and
:func:`merge` adds them up. Counters and histograms (:data:`COUNTING`) are the whole server's
since it started, kept by a :class:`Tally` in the first process, so they never go down while it
runs: not when a process dies and is started again (counting from 0), nor while one hangs.
Gauges are the sum over the processes that answered, except the series that describe one
process (:data:`PER_PROCESS`, labelled ``process``) and the gauges each process reads from the
same Redis (:data:`SHARED`, whose sum would count each worker N times);
``circles_process_up{process}`` says which processes answered.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from circles.common.logs import Logger

log = Logger()

#: Method labels are the API's methods; anything else is counted as one of these two.
UNKNOWN_METHOD = "unknown"
INVALID_REQUEST = "invalid"

#: Families of one process each: labelled ``process`` in the whole server's view, not summed.
PER_PROCESS = frozenset({"circles_process_connections_open", "circles_process_resident_memory_bytes"})
#: Gauges every process reads from the same Redis: one process's value (the lowest-numbered
#: that has it) in the whole server's view, not the sum.
SHARED = frozenset({"circles_workers", "circles_queue_length", "circles_dead_letters"})
#: The types of the families whose samples only count up (a counter's ``_total``, a histogram's
#: buckets, ``_count`` and ``_sum``): the whole server's, kept by a :class:`Tally`.
COUNTING = frozenset({"counter", "histogram", "summary"})


class Metrics:
    """What operators watch: connections, requests, authentication, plays, webhooks, Redis.

    ``clock``: when each series of requests and plays was created (the ``_created`` samples)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.registry = CollectorRegistry()
        self._methods: frozenset = frozenset()  # the method labels (label_methods)
        self.connections = Gauge("circles_connections_open", "Open WebSocket connections", registry=self.registry)
        self._requests = CountedCounter(clock, "circles_requests", "JSON-RPC requests by method and outcome (ok, the "
                                        "error code, or cancelled: the connection closed first)", ["method", "outcome"])
        self.registry.register(self._requests)
        authentications = Counter("circles_authentications", "authenticate calls by result", ["result"],
                                  registry=self.registry)
        self.auth_successes = authentications.labels("success")
        self.auth_failures = authentications.labels("failure")
        self.play_seconds = CountedHistogram(clock, "circles_play_seconds", "Time from play to its answer",
                                             (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.registry.register(self.play_seconds)
        self.webhooks = Counter("circles_webhooks", "Webhook deliveries by provider and HTTP status",
                                ["provider", "status"], registry=self.registry)
        self.tasks_in_flight = Gauge("circles_tasks_in_flight", "plays waiting for a worker's answer",
                                     registry=self.registry)
        self._redis_connects: Callable[[], int] = lambda: 0
        self.registry.register(_RedisReconnects(lambda: self._redis_connects()))
        self.slow_reader_closes = Counter("circles_slow_reader_closes", "WebSocket connections closed for leaving "
                                          "more than twice --max-message-size of replies unread past "
                                          "--slow-reader-timeout", registry=self.registry)
        self.tcp_connections = Gauge("circles_tcp_connections_open",
                                     "Accepted TCP connections not yet closed (WebSockets, HTTP, pending)",
                                     registry=self.registry)
        self._refusals: dict[str, Callable[[], int]] = {}
        self.registry.register(_Refusals(self._refusals))
        self._workers = _Workers()
        self.registry.register(self._workers)
        self._open_connections: Callable[[], int] = lambda: 0
        #: The whole server's exposition (bytes, or None when it cannot be told: ``/metrics``
        #: answers 503) when this process is one of ``--processes`` (set by
        #: :func:`circles.server.processes.siblings.join`); None: this process's is the server's.
        self.whole: Callable[[], Deferred] | None = None

    def request(self, method, outcome) -> None:
        """Count one JSON-RPC request; ``method`` is None for one that was not a valid request,
        ``outcome`` "ok", an error code or "cancelled". (The JSON-RPC Dispatcher's ``observe`` hook.)"""
        # Keyed by the label, never by the method name as sent: an attacker chooses that, and
        # every distinct name (a megabyte each, if it likes) would stay here for good.
        label = INVALID_REQUEST if method is None else method if method in self._methods else UNKNOWN_METHOD
        self._requests.inc((label, outcome))

    def label_methods(self, names) -> None:
        """Count requests to the methods ``names`` under their own names (the session layer's
        method tables, given once wired); any other name is counted as ``unknown``."""
        self._methods = self._methods | frozenset(names)

    def watch_connections(self, open_connections: Callable[[], int]) -> None:
        """Read the number of open connections when scraped (the factory keeps them anyway)."""
        self._open_connections = open_connections
        self.connections.set_function(open_connections)

    def watch_process(self) -> None:
        """This process is one of several: report its own :data:`PER_PROCESS` series too."""
        self.registry.register(_ProcessSeries(lambda: self._open_connections()))

    def watch_script_runner(self, tasks_in_flight: Callable[[], int], connects: Callable[[], int]) -> None:
        """Read the Redis script runner's own counts when scraped (it keeps them anyway)."""
        self.tasks_in_flight.set_function(tasks_in_flight)
        self._redis_connects = connects

    def watch_workers(self, circle_stats: Callable[[], dict], dead_letters: Callable[[], int | None]) -> None:
        """Report the served circles' live workers and queue lengths (``{circle: (workers,
        queue)}``, as the script runner last read them from Redis; workers None: not known, not
        reported) and the dead letters (None: none reported)."""
        self._workers.circle_stats, self._workers.dead_letters = circle_stats, dead_letters

    def watch_accepts(self, tcp_open: Callable[[], int], refused: dict[str, Callable[[], int]]) -> None:
        """Read the accepted connections, and the refusals by reason, when scraped."""
        self.tcp_connections.set_function(tcp_open)
        self._refusals.update(refused)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _created_series() -> bool:
    """Whether counters and histograms report when they were created, as prometheus_client's
    own do (``PROMETHEUS_DISABLE_CREATED_SERIES``, ``disable_created_metrics()``)."""
    return getattr(prometheus_client.metrics, "_use_created", True)


class CountedCounter:
    """A counter with labels, kept as plain numbers and read when scraped: the same exposition as
    prometheus_client's ``Counter``, without its lock and label machinery at every count.

    With the play histogram, prometheus_client's metrics took 5% of the instructions the server
    spends on a play (``bench/instructions.py``). Counted from the reactor's thread only, as
    everything in the server is; a scrape is served there too."""

    def __init__(self, clock: IReactorTime, name: str, documentation: str, labelnames: list[str]) -> None:
        self._clock, self._name, self._documentation, self._labelnames = clock, name, documentation, labelnames
        self._counts: dict[tuple, int] = {}
        self._created: dict[tuple, float] = {}

    def inc(self, labels: tuple) -> None:
        """Count one for the series of ``labels`` (values in the order of the label names)."""
        counts = self._counts
        if labels in counts:
            counts[labels] += 1
        else:
            counts[labels] = 1
            self._created[labels] = self._clock.seconds()

    def collect(self):
        series: dict[tuple, list] = {}  # by the labels as text: -32005 and "-32005" are one series
        for labels, value in self._counts.items():
            text = tuple(map(str, labels))
            if text in series:
                series[text][0] += value
                series[text][1] = min(series[text][1], self._created[labels])
            else:
                series[text] = [value, self._created[labels]]
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        created = _created_series()
        for text, (value, since) in series.items():
            family.add_metric(list(text), value, created=since if created else None)
        yield family


class CountedHistogram:
    """A histogram without labels, kept as plain numbers and read when scraped: the same
    exposition as prometheus_client's ``Histogram`` (cumulative buckets, ``+Inf``, count, sum,
    created), an observation a ``bisect`` and two additions instead of a loop with a lock a step."""

    def __init__(self, clock: IReactorTime, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(float(bound) for bound in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: over every bound (+Inf)
        self._sum = 0.0
        self._created = clock.seconds()

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def collect(self):
        buckets, total = [], 0
        for bound, count in zip((*map(floatToGoString, self._bounds), "+Inf"), self._counts):
            total += count
            buckets.append((bound, total))
        family = HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=self._sum)
        if _created_series():
            family.samples.append(Sample(f"{self._name}_created", {}, self._created))
        yield family


class Tally:
    """The counts of the whole server since it started, across its processes' lives: what
    :func:`merge` reports for each counting sample (:data:`COUNTING`) and each ``_created`` time.
    One lives in the first process, which merges every scrape (the others ask it): a process
    started again takes a number's place but not its memory, and the first one lives as long
    as the server.

    For each process number it keeps the generation it last heard from (a process started again
    in a number's place is the next generation, counting from 0) and that generation's highest
    value of each sample; and ``retired``, the sums of the highest values of the generations
    that ended. The whole server's count is retired plus every number's part (:meth:`totals`).

    Why no count ever goes down: retired and each number's part only grow, taking an answer
    (:meth:`heard`) as follows, a sample that is absent being 0 (counts are never negative).

    - The same generation: each value is the larger of the kept one and the new one. A process
      that hung and answers again has only counted on; a missed scrape changes nothing.
    - A newer generation (the number's process was started again): the kept part is added to
      retired, and the new answer becomes the part: retired plus part goes from R + P to
      R + P + new, never less. The old generation's counts move to retired exactly once (it is
      no longer the number's generation, so no later answer moves them again), and they are
      never in both places: nothing is counted twice.
    - An older generation (read after its successor's, as an answer sent before it died can
      be): ignored; its counts stay as kept.
    - No answer (dead, not yet started again, hung): its part stays as kept.

    What a process counted after the last scrape that reached it is lost if it dies: nobody saw
    it. The memory is bounded by the label sets the processes report (the same as one
    process's registry), once for retired and once per number.
    """

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str]] = {}  # family -> (documentation, type), in order
        self.retired: dict[tuple, float] = {}  # (family, sample, labels) -> sum over ended generations
        self._parts: dict[int, tuple[int, dict[tuple, float]]] = {}  # number -> (generation, highest values)
        self._created: dict[tuple, float] = {}  # (family, sample, labels) -> the earliest time reported

    def describe(self, name: str, documentation: str, kind: str) -> None:
        """A family :meth:`heard` reports samples of (kept to describe them when no process does)."""
        self._families.setdefault(name, (documentation, kind))

    def heard(self, number: int, generation: int, counts: dict[tuple, float], created: dict[tuple, float]) -> None:
        """Process ``number`` (of ``generation``) answered ``counts`` (its counting samples, by
        (family, sample, labels)) and ``created`` (its ``_created`` times, alike)."""
        for key, value in created.items():
            self._created[key] = min(value, self._created.get(key, value))
        kept = self._parts.get(number)
        if kept is None or generation > kept[0]:
            if kept is not None:
                for key, value in kept[1].items():
                    self.retired[key] = self.retired.get(key, 0.0) + value
            self._parts[number] = (generation, dict(counts))
        elif generation == kept[0]:
            part = kept[1]
            for key, value in counts.items():
                part[key] = max(value, part.get(key, value))

    def totals(self) -> dict[tuple, float]:
        """Each counting sample of the whole server and each ``_created`` time, by (family,
        sample, labels)."""
        totals = dict(self.retired)
        for _, part in self._parts.values():
            for key, value in part.items():
                totals[key] = totals.get(key, 0.0) + value
        totals.update(self._created)
        return totals

    def families(self) -> dict[str, tuple[str, str]]:
        """The families of :meth:`totals`: ``{name: (documentation, type)}``."""
        return dict(self._families)


def merge(answers: dict[int, tuple[int, bytes] | None], tally: Tally) -> bytes:
    """The whole server's exposition from each process's answer (by process number: its
    generation and exposition; None: it did not answer): the counting samples and ``_created``
    times as ``tally`` keeps them (having heard these answers), every other sample summed over
    the processes that answered, except :data:`PER_PROCESS` (labelled ``process``) and
    :data:`SHARED` (one process's); with ``circles_process_up{process}``, 1 for each that
    answered, 0 for the others (or for an answer that is no exposition)."""
    parsed: dict[int, list] = {}
    for number in sorted(answers):
        answer = answers[number]
        if answer is not None:
            try:
                parsed[number] = list(text_string_to_metric_families(answer[1].decode("utf-8")))
            except (ValueError, UnicodeDecodeError):
                log.warn("server process {n} answered metrics that are no exposition", n=number)
    families: dict[str, tuple[Metric, dict]] = {}
    for number, parts in parsed.items():
        counts: dict[tuple, float] = {}
        created: dict[tuple, float] = {}
        for family in parts:
            kept = family.type in COUNTING or family.name.endswith("_created")
            if kept:
                tally.describe(family.name, family.documentation, family.type)
            families.setdefault(family.name, (Metric(family.name, family.documentation, family.type), {}))
            for sample in family.samples:
                labels = dict(sample.labels, process=str(number)) if family.name in PER_PROCESS else sample.labels
                key = (sample.name, tuple(sorted(labels.items())))
                if kept:
                    (counts if family.type in COUNTING else created)[(family.name, *key)] = sample.value
                    continue
                values = families[family.name][1]
                if key not in values:
                    values[key] = sample.value
                elif family.name not in SHARED:
                    values[key] += sample.value
        tally.heard(number, answers[number][0], counts, created)  # type: ignore[index]  # parsed: answered
    for name, (documentation, kind) in tally.families().items():
        families.setdefault(name, (Metric(name, documentation, kind), {}))
    for (name, sample, labels), value in tally.totals().items():
        families[name][1][(sample, labels)] = value
    up = Metric("circles_process_up", "Whether each server process of --processes answered this scrape", "gauge")
    for number in sorted(answers):
        up.add_sample("circles_process_up", {"process": str(number)}, 1 if number in parsed else 0)
    merged = [up]
    for family, values in families.values():
        for (name, labels), value in values.items():
            family.add_sample(name, dict(labels), value)
        merged.append(family)
    registry = CollectorRegistry()
    registry.register(_Fixed(merged))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)


class _ProcessSeries:
    """:data:`PER_PROCESS`: this process's open WebSocket connections and resident memory (Linux;
    elsewhere none)."""

    def __init__(self, open_connections: Callable[[], int]) -> None:
        self._open_connections = open_connections

    def collect(self):
        yield GaugeMetricFamily("circles_process_connections_open", "Open WebSocket connections of each process",
                                value=self._open_connections())
        resident = _resident_bytes()
        if resident is not None:
            yield GaugeMetricFamily("circles_process_resident_memory_bytes", "Resident memory of each process",
                                    value=resident)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _RedisReconnects:
    """``circles_redis_reconnects_total``: connections to Redis after the first."""

    def __init__(self, connects: Callable[[], int]) -> None:
        self._connects = connects

    def collect(self):
        family = CounterMetricFamily("circles_redis_reconnects", "Times the connection to Redis came back")
        family.add_metric([], max(0, self._connects() - 1))
        yield family


class _Workers:
    """``circles_workers{circle}``, ``circles_queue_length{circle}``: for the circles the server
    serves only (a bounded label set), as read from Redis in its health loop (every 2 s); and
    ``circles_dead_letters``. Nothing until the first read."""

    def __init__(self) -> None:
        self.circle_stats: Callable[[], dict] = dict
        self.dead_letters: Callable[[], int | None] = lambda: None

    def collect(self):
        stats = self.circle_stats()
        workers = GaugeMetricFamily("circles_workers", "Live workers of a circle (heartbeat within its TTL)",
                                    labels=["circle"])
        queue = GaugeMetricFamily("circles_queue_length", "Tasks waiting in a circle's queue", labels=["circle"])
        for circle, (live, waiting) in sorted(stats.items()):
            if live is not None:  # None: not known (a dispatcher's workers do not register)
                workers.add_metric([circle], live)
            queue.add_metric([circle], waiting)
        yield workers
        yield queue
        dead = self.dead_letters()
        if dead is not None:
            yield GaugeMetricFamily("circles_dead_letters", "Webhook tasks in the dead-letter list "
                                    "(circles tasks dead-letter)", value=dead)


class _Refusals:
    """``circles_connections_refused_total{reason}``: connections closed as soon as accepted."""

    def __init__(self, counts: dict[str, Callable[[], int]]) -> None:
        self._counts = counts

    def collect(self):
        family = CounterMetricFamily("circles_connections_refused", "Connections refused as they were accepted",
                                     labels=["reason"])
        for reason, count in self._counts.items():
            family.add_metric([reason], count())
        yield family
