"""A circles deployment on one machine, under load, losing its Redis primary and then a server:
the harness behind tests/integration/test_deployment.py and bench/failover.py.

Real processes: :class:`~devtools.redis_server.ReplicatedRedis` (a primary, a replica, three
Sentinels), two ``twistd -n circles`` servers on different ports (standing for two hosts) and two
``twistd -n circles-worker``, all given the ``redis+sentinel://`` URL. The load runs in this
process, on its reactor: N clients, each a :class:`~circles.client.ReconnectingClient` over both
servers' URLs (half starting on each), playing a small script in a loop, and a Stripe sender
posting signed events with unique ids, alternately to each live server. The schedule: warm up;
SIGKILL the primary; wait for the Sentinels' new one; restart the old node as its replica, not
electable until in sync (as an operator replacing a node would: a killed primary restarted as-is
takes Sentinel ~20 s to demote, and a node Sentinel promotes before it is in sync loses data); later
SIGKILL one server (its clients move to the other); run on; stop the load and wait, bounded,
for every outstanding play. :func:`run` returns the report (plain JSON-able data): plays by
outcome, plays never answered, how long after each kill plays succeeded again, webhook events
acknowledged vs their tasks found on the final primary.

Blocking steps (starting Redis, waiting for a failover) run in threads so the load goes on.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from circles.client import ConnectionClosed, ReconnectingClient, RPCError
from circles.client.signing import generate, public_key
from circles.server.providers.events import StripeEvent

from .redis_server import RedisProcess, ReplicatedRedis
from .twistd import Twistd
from .webhook_support import STRIPE_SECRET, encode, post, stripe_event, stripe_headers

TINY_WORKER = ["--engine", "circles.worker.tiny_engine:run"]
SCRIPT, OUTPUT = "let x = 6; x * 7", "42"
#: What each Stripe event runs (--stripe-script): the tiny engine has no on_stripe_event handler.
STRIPE_SCRIPT = '`stripe event for ${CONTEXT_ID}`'



@dataclass
class Schedule:
    """How long each phase lasts (seconds) and how much load; the defaults are the CI test's."""

    clients: int = 8
    warmup: float = 4.0
    primary_kills: int = 1
    after_failover: float = 5.0  # load after each failover, once the old node is back as an in-sync replica
    after_server_kill: float = 5.0
    play_timeout: float = 5.0  # each play's own timeout, sent to the server
    think: float = 0.05  # pause between a client's plays (after a failure: retry_pause)
    retry_pause: float = 0.2
    webhooks_per_second: float = 4.0
    webhook_replica_timeout: float | None = None  # the servers' --webhook-replica-timeout; None: theirs
    drain: float = 15.0  # bound on waiting for outstanding plays and webhooks once the load stops
    direct: bool = False  # servers and workers on the first primary's redis:// URL, no Sentinel
    # Redis' repl-diskless-sync-delay on every node (None: Redis' default, 5 s): how long a primary
    # waits before syncing a (re)joining replica, so how long webhooks are 503 after a failover.
    sync_delay: int | None = None

    @classmethod
    def lasting(cls, seconds: float, **overrides) -> Schedule:
        """A soak of about ``seconds`` of load: a primary failover every ~30 s, then a server kill."""
        schedule = cls(**overrides)
        schedule.warmup = max(schedule.warmup, 5.0)
        schedule.after_server_kill = max(schedule.after_server_kill, min(30.0, seconds / 4))
        middle = max(seconds - schedule.warmup - schedule.after_server_kill, 10.0)
        schedule.primary_kills = max(1, round(middle / 30))
        # A failover takes ~2.5 s, the old node's return as a synced replica ~6 s more.
        schedule.after_failover = max(middle / schedule.primary_kills - 8.5, 5.0)
        return schedule


@dataclass
class _Play:
    client: int
    issued: float
    url: str | None = None  # the server it went to
    answered: float | None = None
    outcome: Any = None  # "ok", "wrong", a JSON-RPC code, "ConnectionClosed", another exception's name
    deferred: Deferred | None = field(default=None, repr=False)


@dataclass
class _Hook:
    event_id: str
    port: int
    sent: float
    body: bytes = field(repr=False)
    answered: float | None = None
    status: Any = None  # HTTP status, or an exception's name
    task_id: str | None = None


class Deployment:
    """The processes: Redis with Sentinels, two servers, two workers."""

    def __init__(self, directory: str, schedule: Schedule) -> None:
        self.directory = directory
        self.schedule = schedule
        self.circle = public_key(generate())
        self.redis = ReplicatedRedis(os.path.join(directory, "redis"))
        self.redis_url = self.redis.nodes[0].url if schedule.direct else self.redis.url
        self.servers: list[Twistd] = []
        self.workers: list[Twistd] = []
        self.ports: list[int] = []
        self.killed_servers: set[int] = set()  # indexes in servers

    def _process(self, plugin: str, args: list, name: str) -> Twistd:
        cwd = os.path.join(self.directory, name)
        os.makedirs(cwd, exist_ok=True)
        return Twistd(args, cwd, plugin=plugin)

    async def start(self, reactor) -> None:
        """Redis first, settled (the replica in sync, as in a running deployment: a server that
        met the primary still without its replica would turn webhooks away until its next
        ``ROLE``), then the twistd processes; returns once both servers are ready and both workers
        wait for tasks."""
        if self.schedule.sync_delay is not None:
            for node in self.redis.nodes:
                node.args += ["--repl-diskless-sync-delay", str(self.schedule.sync_delay)]
        for i, node in enumerate(self.redis.nodes):  # Redis' own logs, for save_logs
            node.args += ["--logfile", self._redis_log(f"node{i}")]
        for i, sentinel in enumerate(self.redis.sentinels):
            with open(sentinel.config, "a") as f:
                f.write(f"logfile {self._redis_log(f'sentinel{i}')}\n")
        await _in_thread(reactor, self.redis.start)
        secrets = os.path.join(self.directory, "stripe.secrets")
        with open(secrets, "w") as f:
            f.write(STRIPE_SECRET + "\n")
        os.chmod(secrets, 0o600)
        stripe_script = os.path.join(self.directory, "stripe.rhai")
        with open(stripe_script, "w") as f:
            f.write(STRIPE_SCRIPT)
        server_args = ["--listen", "tcp:0:interface=127.0.0.1", "-k", self.circle, "--auth", "--redis-url",
                       self.redis_url, "--stripe-secret-file", secrets, "--stripe-script", stripe_script,
                       "--shutdown-grace", "2", "--drain-grace", "0",  # no balancer to wait for
                       "--script-timeout", str(self.schedule.play_timeout)]
        if self.schedule.webhook_replica_timeout is not None:
            server_args += ["--webhook-replica-timeout", str(self.schedule.webhook_replica_timeout)]
        self.servers = [self._process("circles", server_args, f"server{i}") for i in range(2)]
        self.workers = [self._process("circles-worker", ["-k", self.circle, "--redis-url", self.redis_url,
                                                         *TINY_WORKER], f"worker{i}") for i in range(2)]
        self.ports = [await _in_thread(reactor, server.wait_listening, 60) for server in self.servers]
        for port, server in zip(self.ports, self.servers):
            await _eventually(reactor, lambda: _ready(port, server), 60, f"server on {port} never ready")  # noqa: B023
        for worker in self.workers:
            await _eventually(reactor, lambda: _waiting(worker), 60, "a worker never waited for tasks")  # noqa: B023

    def _redis_log(self, name: str) -> str:
        return os.path.join(self.directory, "redis", f"{name}.log")

    def url(self, index: int) -> str:
        return f"ws://127.0.0.1:{self.ports[index]}/{self.circle}"

    def live_ports(self) -> list[int]:
        return [port for i, port in enumerate(self.ports) if i not in self.killed_servers]

    def kill_server(self, index: int) -> None:
        self.killed_servers.add(index)
        self.servers[index].proc.kill()

    async def fail_over(self, reactor) -> dict:
        """SIGKILL the primary, wait for the Sentinels to promote the replica, restart the old
        node as the new primary's replica. Times in seconds from the kill."""
        old = await _in_thread(reactor, self.redis.primary)
        if old is None:
            raise RuntimeError("the Sentinels name no primary of ours")
        killed = reactor.seconds()
        old.kill()
        new = await _in_thread(reactor, self.redis.wait_for_new_primary, old, 30.0)
        promoted = reactor.seconds()
        # As an operator replacing the node would: once every Sentinel names the new primary, the
        # old node comes back (no persistence here: empty, or with the stale dump.rdb its last full
        # sync left) as its replica, with replica-priority 0 until it holds the data. Restarted at
        # once and electable, it was seen promoted when the Sentinels briefly took the new primary
        # for down (down-after 1 s, two busy cores): acknowledged events were lost with the new
        # primary's data.
        await _eventually(reactor, lambda: self._all_name(new), 30, "the Sentinels did not agree on the new primary")
        agreed = reactor.seconds()
        await _in_thread(reactor, _restart_as_replica, old, new)
        back = reactor.seconds()
        await _eventually(reactor, lambda: _in_sync(old), 30, "the replacement replica never synced")
        await _in_thread(reactor, lambda: _config_set(old, "replica-priority", "100"))
        return {"killed_port": old.port, "new_primary_port": new.port, "at": killed,
                "new_primary_s": round(promoted - killed, 3), "sentinels_agree_s": round(agreed - killed, 3),
                "old_node_back_s": round(back - killed, 3), "old_node_synced_s": round(reactor.seconds() - killed, 3)}

    def _all_name(self, node: RedisProcess) -> bool:
        """Whether every Sentinel names ``node`` primary."""
        for sentinel in self.redis.sentinels:
            try:
                client = sentinel.client()
                try:
                    _, port = client("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.redis.master)
                finally:
                    client.close()
            except (OSError, RuntimeError, ConnectionError, TypeError, ValueError):
                return False
            if int(port) != node.port:
                return False
        return True

    def electable(self) -> bool:
        """Settled, and every Sentinel knows a replica it may promote (priority above 0)."""
        if not self.redis.settled():
            return False
        for sentinel in self.redis.sentinels:
            try:
                client = sentinel.client()
                try:
                    replicas = [dict(zip(r[0::2], r[1::2])) for r in client("SENTINEL", "REPLICAS", self.redis.master)]
                finally:
                    client.close()
            except (OSError, RuntimeError, ConnectionError):
                return False
            if not any(r.get("slave-priority", "0") != "0" and "s_down" not in r.get("flags", "") for r in replicas):
                return False
        return True

    async def stop(self, reactor) -> None:
        processes = self.workers + self.servers
        await DeferredList([_in_thread(reactor, p.stop) for p in processes], consumeErrors=True)
        await _in_thread(reactor, self.redis.stop)

    def save_logs(self, directory: str) -> None:
        """Each process's log as ``directory/<name>.log`` (Redis nodes and Sentinels included)."""
        os.makedirs(directory, exist_ok=True)
        for name, process in self.named():
            with open(os.path.join(directory, f"{name}.log"), "w") as f:
                f.write(process.output)
        for name in [f"node{i}" for i in range(len(self.redis.nodes))] + \
                [f"sentinel{i}" for i in range(len(self.redis.sentinels))]:
            if os.path.exists(self._redis_log(name)):
                shutil.copy(self._redis_log(name), os.path.join(directory, f"{name}.log"))

    def named(self) -> list[tuple[str, Twistd]]:
        return [(f"server{i}", p) for i, p in enumerate(self.servers)] + \
            [(f"worker{i}", p) for i, p in enumerate(self.workers)]

    def refusals(self) -> dict:
        """Why the servers answered webhooks 503, as they logged it, counted."""
        reasons: Counter = Counter()
        for server in self.servers:
            for match in re.finditer(r"refused with 503: [^(\n]*\((.*)\)\s*$", server.output, re.M):
                reasons[re.sub(r"\d+(\.\d+)?", "N", match.group(1))] += 1
        return dict(reasons.most_common())

    def tracebacks(self) -> dict:
        return {name: p.output.count("Traceback") for name, p in self.named()}


def _restart_as_replica(old: RedisProcess, new: RedisProcess) -> None:
    args = list(old.args)
    if "--replicaof" in args:  # --replicaof HOST PORT: whom it followed before
        at = args.index("--replicaof")
        del args[at:at + 3]
    old.args = args + ["--replicaof", "127.0.0.1", str(new.port), "--replica-priority", "0"]
    try:
        old.start()
    except RuntimeError as e:  # a replica answers PING with LOADING while it loads the primary's data
        if "LOADING" not in str(e):
            raise
        _wait_for_pong(old)
    old.args = old.args[:-2]  # its priority is set back once in sync; a later restart sets it anew


def _wait_for_pong(node: RedisProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = node.client()
            try:
                if client("PING") == "PONG":
                    return
            finally:
                client.close()
        except (OSError, RuntimeError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server on {node.port} did not answer PING")
        time.sleep(0.05)


def _in_sync(node: RedisProcess) -> bool:
    try:
        client = node.client()
        try:
            info = client("INFO", "replication")
        finally:
            client.close()
    except (OSError, RuntimeError, ConnectionError):  # LOADING, or not up yet
        return False
    return "master_link_status:up" in info and "master_sync_in_progress:0" in info


def _config_set(node: RedisProcess, name: str, value: str) -> None:
    client = node.client()
    try:
        client("CONFIG", "SET", name, value)
    finally:
        client.close()


def _ready(port: int, server: Twistd) -> bool:
    if server.proc.poll() is not None:
        raise AssertionError(f"server on {port} exited:\n{server.output}")
    return _http_status(port, "/ready") == 200


def _waiting(worker: Twistd) -> bool:
    if worker.proc.poll() is not None:
        raise AssertionError(f"worker exited:\n{worker.output}")
    return "waiting for tasks" in worker.output


def _http_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def _in_thread(reactor, f, *args) -> Deferred:
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


async def _sleep(reactor, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _eventually(reactor, predicate, timeout: float, message: str) -> None:
    """Poll ``predicate`` (blocking, so in a thread) until true, or fail with ``message``."""
    deadline = time.monotonic() + timeout
    while not await _in_thread(reactor, predicate):
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await _sleep(reactor, 0.1)


class Load:
    """The clients' play loops, the webhook sender and a /ready watcher, until :meth:`stop`."""

    def __init__(self, reactor, deployment: Deployment, schedule: Schedule) -> None:
        self.reactor = reactor
        self.deployment = deployment
        self.schedule = schedule
        self.plays: list[_Play] = []
        self.hooks: list[_Hook] = []
        self.ready: dict[int, list] = {port: [] for port in deployment.ports}  # port: [(time, status)]
        self.primaries: list[tuple[float, int | None]] = []  # (time, port): each change the Sentinels name
        self.running = True
        self.clients: list[ReconnectingClient] = []
        self.first_server: list[int] = []  # client: index of the server it started on
        self.loops: list[Deferred] = []

    def start(self) -> None:
        d = self.deployment
        for i in range(self.schedule.clients):
            first = i % 2
            client = ReconnectingClient([d.url(first), d.url(1 - first)], reactor=self.reactor, key=generate())
            client.start()
            self.clients.append(client)
            self.first_server.append(first)
        self.loops = [ensureDeferred(self._client_loop(i, c)) for i, c in enumerate(self.clients)]
        self.loops += [ensureDeferred(self._webhook_loop()), ensureDeferred(self._ready_loop()),
                       ensureDeferred(self._primary_loop())]

    async def _client_loop(self, index: int, client: ReconnectingClient) -> None:
        while self.running:
            play = _Play(index, self.reactor.seconds())
            self.plays.append(play)

            def go(connection, play=play):
                play.url = connection.url
                return connection.play(SCRIPT, timeout=self.schedule.play_timeout)

            play.deferred = client.client().addCallback(go)
            play.deferred.addBoth(self._answered, play)
            try:
                await play.deferred
            except CancelledError:
                return
            await _sleep(self.reactor, self.schedule.think if play.outcome == "ok" else self.schedule.retry_pause)

    def _answered(self, result, play: _Play):
        if play.outcome is not None:  # cancelled at the end, already counted as unanswered
            return result
        play.answered = self.reactor.seconds()
        if not isinstance(result, Failure):
            play.outcome = "ok" if result == OUTPUT else "wrong"
            return result
        if result.check(RPCError):
            play.outcome = result.value.code
        elif result.check(ConnectionClosed):
            play.outcome = "ConnectionClosed"
        else:
            play.outcome = result.type.__name__
        return None  # counted; the loop goes on

    async def _webhook_loop(self) -> None:
        n = 0
        while self.running:
            ports = self.deployment.live_ports()
            port = ports[n % len(ports)]
            n += 1
            event_id = f"evt_deploy_{n}_{uuid.uuid4().hex[:12]}"
            hook = _Hook(event_id, port, self.reactor.seconds(), encode(stripe_event(event_id)))
            self.hooks.append(hook)
            self._deliver(hook)
            await _sleep(self.reactor, 1 / self.schedule.webhooks_per_second)

    def _deliver(self, hook: _Hook, port: int | None = None) -> Deferred:
        d = ensureDeferred(post(port or hook.port, f"/webhooks/stripe/{self.deployment.circle}", hook.body,
                                stripe_headers(hook.body)))
        d.addTimeout(self.schedule.drain, self.reactor)

        def answered(reply):
            hook.answered, hook.status = self.reactor.seconds(), reply.code
            if reply.code == 200:
                hook.task_id = reply.json()["task_id"]

        def failed(failure):
            hook.answered, hook.status = self.reactor.seconds(), failure.type.__name__

        return d.addCallbacks(answered, failed)

    async def _ready_loop(self) -> None:
        while self.running:
            for port in self.deployment.live_ports():
                d = ensureDeferred(post(port, "/ready", method=b"GET")).addTimeout(2, self.reactor)
                d.addCallbacks(lambda reply, port=port: self.ready[port].append((self.reactor.seconds(), reply.code)),
                               lambda failure: None)
            await _sleep(self.reactor, 0.25)

    async def _primary_loop(self) -> None:
        """Which node the Sentinels name primary, noted at each change: a change no kill caused
        (a node promoted behind the schedule's back) shows in the report."""
        if self.schedule.direct:
            return
        while self.running:
            node = await _in_thread(self.reactor, self.deployment.redis.primary)
            port = None if node is None else node.port
            if not self.primaries or self.primaries[-1][1] != port:
                self.primaries.append((self.reactor.seconds(), port))
            await _sleep(self.reactor, 0.25)

    async def stop(self, drain: float | None = None) -> None:
        """Stop issuing; wait (bounded by ``drain``, the schedule's by default) for every
        outstanding play and webhook; the plays still outstanding are counted unanswered."""
        self.running = False
        deadline = self.reactor.seconds() + (self.schedule.drain if drain is None else drain)
        while self.reactor.seconds() < deadline and (self._outstanding() or any(h.status is None for h in self.hooks)):
            await _sleep(self.reactor, 0.05)
        for play in self._outstanding():
            play.outcome = "unanswered"
            play.deferred.cancel()
        await DeferredList(self.loops, consumeErrors=True)
        await DeferredList([c.stop() for c in self.clients], consumeErrors=True)

    def _outstanding(self) -> list[_Play]:
        return [p for p in self.plays if p.outcome is None]

    async def redeliver(self, hooks: list[_Hook]) -> list[tuple[_Hook, str | None]]:
        """Deliver acknowledged events again (to the live server): (event, task id answered)."""
        results = []
        for hook in hooks:
            again = _Hook(hook.event_id, self.deployment.live_ports()[0], self.reactor.seconds(), hook.body)
            await self._deliver(again)
            results.append((hook, again.task_id))
        return results


def _phase_counts(plays: list[_Play]) -> dict:
    counts = Counter(str(p.outcome) for p in plays)
    return dict(sorted(counts.items()))


def _recovery(plays: list[_Play], clients: int, at: float, only: set | None = None) -> dict:
    """After a kill at ``at``: how long until a play issued after it succeeded on any client, and
    until every client (of ``only``, if given) had one."""
    firsts: dict[int, float] = {}
    for p in plays:
        if p.outcome == "ok" and p.issued >= at and (only is None or p.client in only):
            firsts[p.client] = min(firsts.get(p.client, p.answered), p.answered)
    wanted = set(range(clients)) if only is None else only
    return {"first_ok_s": round(min(firsts.values()) - at, 3) if firsts else None,
            "all_clients_ok_s": round(max(firsts.values()) - at, 3) if set(firsts) >= wanted else None,
            "clients_without_ok": len(wanted - set(firsts))}


def _tasks_found(deployment: Deployment, hooks: list[_Hook]) -> dict:
    """Which acknowledged events' tasks the final primary holds (the task hash, else the event's
    seen key: the task may have run and expired, but the event was kept)."""
    primary = deployment.redis.nodes[0] if deployment.schedule.direct else deployment.redis.primary()
    client = primary.client()
    try:
        missing, seen_only, statuses = [], [], Counter()
        for hook in hooks:
            status = client("HGET", f"circles:task:{hook.task_id}", "status")
            if status is not None:
                statuses[status] += 1
                continue
            seen = "circles:seen:" + StripeEvent.parse(hook.body).dedupe_name(deployment.circle)
            (seen_only if client("EXISTS", seen) else missing).append(hook.event_id)
        return {"primary_port": primary.port, "found": len(hooks) - len(missing) - len(seen_only),
                "seen_key_only": seen_only, "missing": missing, "statuses": dict(sorted(statuses.items()))}
    finally:
        client.close()


async def run(reactor, directory: str, schedule: Schedule | None = None, logs: str | None = None) -> dict:
    """Start the deployment, run the schedule under load, stop it all; the report. ``logs``: a
    directory to keep the servers' and workers' logs in."""
    schedule = schedule or Schedule()
    began = reactor.seconds()
    deployment = Deployment(directory, schedule)
    report: dict = {"schedule": asdict(schedule)}
    load: Load | None = None
    try:
        await deployment.start(reactor)
        report["startup_s"] = round(reactor.seconds() - began, 2)
        load = Load(reactor, deployment, schedule)
        load.start()
        load_began = reactor.seconds()
        await _sleep(reactor, schedule.warmup)
        kills = []
        for k in range(schedule.primary_kills):
            if k:  # the restarted node must be a linked, electable replica before the next failover
                await _eventually(reactor, deployment.electable, 30, "the Sentinels did not settle again")
            kill = await deployment.fail_over(reactor)
            kill["what"] = "primary"
            kills.append(kill)
            await _sleep(reactor, schedule.after_failover)
        killed_at = reactor.seconds()
        deployment.kill_server(0)
        kills.append({"what": "server0", "at": killed_at})
        await _sleep(reactor, schedule.after_server_kill)
        load_ended = reactor.seconds()
        await load.stop()
        report["tracebacks"] = deployment.tracebacks()
        report["webhook_503_reasons"] = deployment.refusals()
        # Redelivered events (acknowledged before the first failover) must be recognised as such.
        early = [h for h in load.hooks if h.task_id and h.answered < kills[0]["at"]][:5]
        redelivered = await load.redeliver(early)
        acked = [h for h in load.hooks if h.status == 200]
        found = await _in_thread(reactor, _tasks_found, deployment, acked)
    except BaseException:
        for name, process in deployment.named():
            print(f"---- {name} (last lines)\n" + "".join(process.lines[-40:]))
        if load is not None and load.running:
            await load.stop(drain=0)  # no client left connecting once the processes are gone
        raise
    finally:
        await deployment.stop(reactor)
        if logs is not None:
            deployment.save_logs(logs)
    report.update(_summary(load, deployment, kills, load_began, load_ended, acked, found, redelivered))
    report["total_s"] = round(reactor.seconds() - began, 2)
    return report


def _summary(load: Load, deployment: Deployment, kills: list, began: float, ended: float, acked: list,
             found: dict, redelivered: list) -> dict:
    plays = load.plays
    failed = Counter(p.outcome for p in plays if isinstance(p.outcome, int))
    answered = [p for p in plays if p.answered is not None]
    phases, bounds = {}, [began] + [k["at"] for k in kills] + [ended + 3600]
    names = ["warmup"] + [f"after {k['what']} kill" if k["what"] != "primary" else f"after primary kill {i + 1}"
                          for i, k in enumerate(kills)]
    hook_phases = {}
    for name, start, end in zip(names, bounds, bounds[1:]):
        phases[name] = _phase_counts([p for p in plays if start <= p.issued < end])
        hook_phases[name] = dict(sorted(Counter(str(h.status) for h in load.hooks if start <= h.sent < end).items()))
    refused = [h.sent for h in load.hooks if h.status == 503]
    server_kill = kills[-1]["at"]
    on_killed = {i for i, first in enumerate(load.first_server) if first == 0}
    for kill in kills:
        kill.update(_recovery(plays, len(load.clients), kill["at"]))
        if kill["what"] != "primary":  # the clients that had to move to the other server
            kill["moved_clients"] = _recovery(plays, len(load.clients), kill["at"], on_killed)
        kill["at_s"] = round(kill.pop("at") - began, 3)
    last_ok = {p.client for p in plays if p.outcome == "ok" and p.issued >= server_kill}
    first_failover = began + kills[0]["at_s"]
    webhooks = Counter(str(h.status) for h in load.hooks)
    ready = {}
    for index, port in enumerate(deployment.ports):
        samples = load.ready[port]
        not_ready = [t for t, code in samples if code != 200]
        ready[f"server{index}"] = {"samples": len(samples), "not_ready": len(not_ready),
                                   "not_ready_from_s": round(min(not_ready) - began, 2) if not_ready else None,
                                   "not_ready_until_s": round(max(not_ready) - began, 2) if not_ready else None}
    return {
        "load_s": round(ended - began, 2),
        "plays": {
            "issued": len(plays),
            "ok": sum(p.outcome == "ok" for p in plays),
            "ok_per_s": round(sum(p.outcome == "ok" for p in plays) / max(ended - began, 1e-9), 1),
            "wrong_output": sum(p.outcome == "wrong" for p in plays),
            "failed_by_code": {str(code): n for code, n in sorted(failed.items())},
            "connection_closed": sum(p.outcome == "ConnectionClosed" for p in plays),
            "other_errors": dict(Counter(p.outcome for p in plays if isinstance(p.outcome, str) and p.outcome
                                         not in ("ok", "wrong", "ConnectionClosed", "unanswered"))),
            "unanswered": sum(p.outcome == "unanswered" for p in plays),
            "slowest_answer_s": round(max((p.answered - p.issued for p in answered), default=0), 3),
            "timed_out": [{"client": p.client, "server": _server(deployment, p.url), "issued_s": round(p.issued - began, 3),
                           "answered_s": round(p.answered - began, 3)} for p in plays if p.outcome == -32003][:20],
            "by_phase": phases,
        },
        "kills": kills,
        "clients": {
            "count": len(load.clients),
            "started_on_killed_server": len(on_killed),
            "ok_after_server_kill": {"started_on_killed": len(last_ok & on_killed),
                                     "started_on_other": len(last_ok - on_killed)},
            "ok_plays_by_server": dict(Counter(_server(deployment, p.url) for p in plays if p.outcome == "ok" and p.url)),
        },
        "webhooks": {
            "sent": len(load.hooks),
            "by_status": dict(sorted(webhooks.items())),
            "by_phase": hook_phases,
            "503_sent_from_s": round(min(refused) - began, 2) if refused else None,
            "503_sent_until_s": round(max(refused) - began, 2) if refused else None,
            "acked": len(acked),
            "acked_after_failover": sum(h.sent >= first_failover for h in acked),
            "tasks_found": found["found"],
            "task_statuses": found["statuses"],  # the workers ran them: completed, unless still to come
            "seen_key_only": found["seen_key_only"],
            "missing": found["missing"],
            "unanswered": sum(h.status is None for h in load.hooks),
            "redelivered": len(redelivered),
            "redelivered_same_task": sum(h.task_id == task for h, task in redelivered),
        },
        "ready": ready,
        "primary_changes": _changes(load.primaries, kills, began),
    }


def _changes(primaries: list, kills: list, began: float) -> dict:
    """The Sentinels' primary over time, and the changes no kill explains: all but the first
    change to another node after each primary kill."""
    kill_times = [began + k["at_s"] for k in kills if k["what"] == "primary"]
    explained = set()
    for at in kill_times:
        after = [i for i, (t, port) in enumerate(primaries) if t >= at and port is not None]
        if after:
            explained.add(after[0])
    unexpected = [(t, port) for i, (t, port) in enumerate(primaries)
                  if i > 0 and port is not None and i not in explained]
    return {"timeline": [[round(t - began, 2), port] for t, port in primaries],
            "unexplained": [[round(t - began, 2), port] for t, port in unexpected]}


def _server(deployment: Deployment, url: str | None) -> str | None:
    """``server0`` or ``server1``: the one ``url`` names."""
    if url is None:
        return None
    port = int(url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return f"server{deployment.ports.index(port)}"


def print_report(report: dict) -> None:
    print(json.dumps(report, indent=2))
