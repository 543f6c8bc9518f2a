"""The ``circles-worker`` twistd plugin: command-line options in, a :class:`Worker` out.

Without ``--redis-url`` the worker uses the private Redis of a ``circles`` server started in
the same ``--state-dir`` (both default to the same directory), so a one-machine first run is::

    twistd -n circles -k <pk>
    twistd -n circles-worker -k <pk> --exec 'rhai-run {script_file}'
"""

from __future__ import annotations

import inspect
import math
import os
import sys

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.python import usage

from circles.backend import worker_protocols
from circles.backend.init_scripts import InitScriptError, parse_circles
from circles.backend.redis_options import choose_redis, redis_parameters
from circles.backend.redis_url import InvalidRedisURL
from circles.backend.scripts import DEFAULT_MAX_SCRIPT_SIZE
from circles.common import logs
from circles.common.options import at_least_zero, positive, print_version, read_dotenv
from circles.worker.engines import DEFAULT_MAX_MEMORY, PRELUDES, Engine, ExecEngine, load_engine, with_max_memory
from circles.worker.isolation import IsolatedEngine
from circles.worker.job_worker import JobWorker
from circles.worker.service import Worker

log = logs.Logger()

#: The options handed to :class:`Worker` as they are, by its parameter's name. Their defaults are
#: Worker's, written there once, but for ``--concurrency``: from the command line a worker runs
#: several scripts at a time, embedded one at a time unless told.
WORKER_PARAMETERS = {"redis-prefix": "prefix", "concurrency": "concurrency", "script-timeout": "script_timeout",
                     "max-output": "max_output", "heartbeat": "heartbeat", "worker-ttl": "worker_ttl"}
OWN_DEFAULTS = {"concurrency": 4}
#: ``--isolation``: how an ``--engine`` callable runs (docs/worker-protocol.md, "Isolation: why child processes").
ISOLATIONS = ("process", "none")


def _default(option: str):
    """The default of ``--option``: Worker's, unless the command line has its own."""
    if option in OWN_DEFAULTS:
        return OWN_DEFAULTS[option]
    return inspect.signature(Worker).parameters[WORKER_PARAMETERS[option]].default


def importable_here() -> None:
    """Let ``--engine`` name a module of the current directory, as ``python -m`` and ``twistd -y``
    users expect (twistd's own ``sys.path`` has its script's directory instead). Last on the
    path, not first: a file of the working directory never shadows a module the worker itself
    imports later (a stray ``json.py`` or ``random.py``)."""
    here = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == here for entry in sys.path):
        sys.path.append(here)


class Options(usage.Options):
    synopsis = "-k <circle_pk> (--exec 'CMD {script_file}' | --engine package.module:callable) [options]"
    longdesc = (
        "Run the scripts queued for circles: take tasks from Redis, run each with an engine, "
        "reply to the server that queued it. --exec runs an external interpreter on the script "
        "(in a file named by {script_file}; CONTEXT_ID, CALLER_ID, CIRCLES_SOURCE, CIRCLES_TASK_ID and "
        "CIRCLES_ATTEMPT in its environment, and for a webhook event CIRCLES_DATA and CIRCLES_DATA_FILE; "
        "stdout less one final newline is the output). --engine calls a Python "
        "callable (script, context) returning a string (or a Deferred, fired already under --isolation "
        "process), in child processes of the worker (--isolation process) so a script cannot stop it. Scripts see none of the worker's environment "
        "but PATH, LANG, LC_*, TZ and what --exec-env names; each runs in a fresh private directory, "
        "its HOME and TMPDIR, removed afterwards."
    )
    optParameters = [
        logs.LOG_LEVEL_OPTION,
        *redis_parameters("Redis shared with the servers",
                          "the private Redis of a server started with the same --state-dir",
                          "state directory of the server whose private Redis to use"),
        ("concurrency", "c", _default("concurrency"), "scripts run at the same time", positive(int)),
        ("script-timeout", None, _default("script-timeout"), "seconds a script may run before it is stopped",
         positive(float)),
        ("exec", None, None, "command running a script, e.g. 'rhai-run {script_file}'"),
        ("engine", None, None, "Python callable running a script, as package.module:callable"),
        ("prelude", None, None, "with --exec, what goes before each script: none (the default) or rhai; "
         "rhai: const declarations of CONTEXT_ID, CALLER_ID, CIRCLES_SOURCE and CIRCLES_TASK_ID, as Rhai string "
         "literals, at the start of the script's first line (line numbers unchanged)"),
        ("max-output", None, _default("max-output"), "largest output of a script, in bytes, with either engine "
         "(a server's smaller limit, given in its tasks, wins); more is an error result", positive(int)),
        ("isolation", None, None, "with --engine, where the callable runs: process (the default: in child "
         "processes, as many as --concurrency, killed and replaced at a script's timeout, memory bounded by "
         "--max-script-memory) or none (in the worker's own process: a script that computes holds the worker, "
         "its timeout included)"),
        ("max-script-memory", None, DEFAULT_MAX_MEMORY, "most memory a script may take, in bytes (0: no limit): "
         "with --engine under --isolation process, the address space of the child beyond its size once the "
         "engine is loaded (RLIMIT_AS; more is the error 'script exceeded its memory limit'); with --exec, the "
         "address space of each process of the command, interpreter included (RLIMIT_AS: Node.js or a JVM, "
         "which reserve gigabytes, need more or 0); and given to the "
         "engine as context.max_memory (the tiny engine accounts for its values against it)", at_least_zero(int)),
        ("heartbeat", None, _default("heartbeat"), "seconds between the worker's heartbeats in Redis", positive(float)),
        ("worker-ttl", None, _default("worker-ttl"), "seconds without a heartbeat after which the worker counts as "
         "lost: its webhook tasks run again elsewhere, its plays are answered with an error", positive(float)),
        ("worker-protocol", None, worker_protocols.CIRCLES, "the protocol of the server or dispatcher whose jobs "
         "to run: 'circles' (ours) or 'hero' (the hero dispatcher's: job ids from hero:work_queue:{circle}, stop "
         "requests from hero:stop_queue:{circle}; no heartbeat, so --heartbeat and --worker-ttl are unused)",
         worker_protocols.check),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["circles"] = []
        self["exec-env"] = []
        self.init_scripts: tuple = ()  # from -k PK:FILE

    def opt_exec_env(self, name: str) -> None:
        """a variable of the worker's environment that scripts see too (repeatable), with --exec and
        --engine under --isolation process; scripts see no other but PATH, LANG, LC_* and TZ"""
        if not name or "=" in name:
            raise usage.UsageError(f"--exec-env: {name!r} is not a variable's name")
        self["exec-env"].append(name)

    def opt_circle(self, pubkey: str) -> None:
        """circle whose tasks to run, as its public key in hex (repeatable, at least one); PK:FILE also names an init script, run once in the circle, here unless it ran already (README, "Init scripts"); -c is --concurrency here, not --circle as on the server"""  # noqa: E501
        self["circles"].append(pubkey)

    opt_k = opt_circle

    def opt_version(self) -> None:
        """print circles' version (and Twisted's and Python's) and exit"""
        print_version()

    def postOptions(self) -> None:
        try:
            circles, self.init_scripts = parse_circles(self["circles"], DEFAULT_MAX_SCRIPT_SIZE,
                                                        "the server's default --max-script-size")
        except InitScriptError as e:
            raise usage.UsageError(f"-k/--circle: {e}") from None
        self["circles"] = sorted(set(circles))
        if not self["circles"]:
            raise usage.UsageError("give at least one circle with -k/--circle")
        if not self["worker-ttl"] > self["heartbeat"]:
            raise usage.UsageError("--worker-ttl must be longer than --heartbeat")
        if (self["exec"] is None) == (self["engine"] is None):
            raise usage.UsageError("give exactly one of --exec and --engine")
        if self["prelude"] is not None and self["exec"] is None:
            raise usage.UsageError("--prelude is for --exec only (an --engine callable gets the context itself)")
        if self["prelude"] is not None and self["prelude"] not in PRELUDES:
            raise usage.UsageError(f"--prelude: {self['prelude']!r} is not one of {', '.join(PRELUDES)}")
        if self["isolation"] is not None and self["exec"] is not None:
            raise usage.UsageError("--isolation is for --engine only (--exec runs each script in a process group "
                                   "of its own already)")
        if self["isolation"] is None:
            self["isolation"] = ISOLATIONS[0]
        if self["isolation"] not in ISOLATIONS:
            raise usage.UsageError(f"--isolation: {self['isolation']!r} is not one of {', '.join(ISOLATIONS)}")
        try:
            redis = choose_redis(self, global_reactor, read_dotenv())
            self.address, self.private_redis = redis.address, redis.private
            self.redis_source = redis.log_line()  # makeService logs it
        except InvalidRedisURL as e:  # an ssl_ca_certs file that cannot be used
            raise usage.UsageError(f"--redis-url: {e}") from None
        try:
            if self["exec"] is not None:
                self.engine: Engine = ExecEngine(self["exec"], reactor=global_reactor, max_output=self["max-output"],
                                         prelude=self["prelude"] or PRELUDES[0], env_names=self["exec-env"],
                                         max_memory=self["max-script-memory"],
                                         cpu_seconds=cpu_backstop(self["script-timeout"]))
            else:
                importable_here()
                engine = load_engine(self["engine"])  # here too: a mistake is said before any process starts
                if self["isolation"] == "process":
                    self.engine = IsolatedEngine(self["engine"], reactor=global_reactor, size=self["concurrency"],
                                                 max_memory=self["max-script-memory"],
                                                 cpu_seconds=cpu_backstop(self["script-timeout"]),
                                                 max_output=self["max-output"], env_names=self["exec-env"])
                else:
                    self.engine = with_max_memory(engine, self["max-script-memory"])
        except ValueError as e:
            raise usage.UsageError(f"--{'exec' if self['exec'] is not None else 'engine'}: {e}") from None


def cpu_backstop(script_timeout: float) -> int:
    """RLIMIT_CPU seconds of a script: its timeout and a second, so only a script that the kill at
    the deadline somehow missed ever meets it."""
    return math.ceil(script_timeout) + 1


class IsolatingWorker(Worker):
    """A :class:`Worker` whose engine has processes of its own (:class:`IsolatedEngine`): they
    start with it and are stopped once its last script has ended."""
    engine: IsolatedEngine


    def startService(self) -> None:
        super().startService()
        maybeDeferred(self.engine.start).addErrback(
            lambda f: log.error("the engine's processes did not start: {error}", error=str(f.value)))

    def stopService(self) -> Deferred:
        return ensureDeferred(self._stop_engine_after(super().stopService()))

    async def _stop_engine_after(self, worker_stopped: Deferred) -> None:
        """The worker's stop, then the engine's (whose failure does not change the stop's result)."""
        try:
            await worker_stopped
        finally:
            engine_stopped = self.engine.stop()
            try:
                await engine_stopped
            except Exception:
                pass


class IsolatingJobWorker(IsolatingWorker, JobWorker):
    """A :class:`JobWorker` whose engine has processes of its own, as :class:`IsolatingWorker`'s."""


def makeService(config: Options, reactor=global_reactor) -> Worker:
    logs.set_level(config["log-level"])
    log.info("configuration: {source}", source=config.redis_source)
    engine = config.engine
    if isinstance(engine, (ExecEngine, IsolatedEngine)) and engine.reactor is not reactor:
        engine.reactor = reactor
    isolated = isinstance(engine, IsolatedEngine)
    schema = worker_protocols.schema(config["worker-protocol"])
    options = {parameter: config[option] for option, parameter in WORKER_PARAMETERS.items()}
    if schema is not None:  # an ecosystem dispatcher's protocol (circles.worker.job_worker)
        return (IsolatingJobWorker if isolated else JobWorker)(
            config.address, config["circles"], engine, schema=schema, reactor=reactor,
            private_redis=config.private_redis, init_scripts=config.init_scripts, **options)
    kind = IsolatingWorker if isolated else Worker
    return kind(config.address, config["circles"], engine, reactor=reactor, private_redis=config.private_redis,
                init_scripts=config.init_scripts, **options)
