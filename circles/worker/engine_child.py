"""The process an isolated engine runs scripts in: ``python -m circles.worker.engine_child``.

Started by :class:`circles.worker.isolation.IsolatedEngine`, which holds the other end of its
stdin and stdout and kills it (SIGKILL) when a script passes its deadline. It imports the
engine callable once, bounds its own address space (RLIMIT_AS: its size once the engine is
loaded, plus the script memory allowed), then runs one script per request, in order, until its
stdin closes.

Frames, both ways: two big-endian 32-bit lengths (header, body), a JSON header, a body of raw
bytes (a script's text, an output, an error message: UTF-8, lone surrogates kept).

- parent: ``{"kind": "init", "spec", "path", "max_memory"}``; child: ``{"kind": "ready", "pid",
  "baseline", "limit"}`` or ``{"kind": "failed"}`` with the reason as body;
- parent: ``{"kind": "task", "context": {...}, "cpu": seconds, "epoch": n}``, the script as
  body; child: ``{"kind": "done"}`` with the output as body, or ``{"kind": "error", "type": ...}``
  with the message as body; ``type`` is ``engine`` (an :class:`EngineError`, with ``reason``, and
  ``limit``/``size`` for output too large), ``exception`` (anything else an engine raised, with
  ``name`` and ``traceback``) or ``memory`` (a MemoryError: the address space is used up). After
  ``exception`` or ``memory`` the child starts no other script: it is replaced.
- the parent may send tasks before the one running has ended: they run in order, each answered
  once it ends. :data:`GIVE_BACK` (a signal) takes back those not started: the child drops them,
  and the tasks of earlier epochs it reads later, and answers ``{"kind": "returned", "started":
  n}``, the tasks it has started in all (answered ones and the one it runs). The signal waits
  but while a script runs or the child waits for tasks, so it never cuts a frame.

Its stdout and stdin are the protocol's alone: what an engine prints goes to stderr, and its
stdin reads nothing. Each script runs in an empty private directory (its working directory,
``HOME`` and ``TMPDIR``): the one the previous script of this child had if that one left it
empty, else a new one (the old one removed, with what is in it); the context's variables are in
``os.environ``, over the environment the worker gave this process (an allow-list: none of the
worker's secrets).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
import traceback
from collections import deque
from typing import Any

from circles.common import fast_json

FRAME = struct.Struct(">II")
#: The signal that takes back the tasks a child has not started (see above).
GIVE_BACK = signal.SIGUSR1
MAX_TRACEBACK = 16 * 1024  # characters of an engine's traceback sent for the worker's debug log
#: Seconds past a directory's last change after which an unchanged ``lstat`` says it is still
#: empty (:meth:`Child._untouched`): more than the coarsest timestamps of a local file system
#: (whole seconds, ext4 with small inodes; two for FAT's mtime).
SETTLED = 2.0


class Reader:
    """Frames from ``fd``, read in large pieces (one read brings all the frames sent together)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def read(self) -> bool:
        """Read what there is (waiting for something); False at end of file."""
        chunk = os.read(self.fd, max(65536, self._missing()))
        if not chunk:
            return False  # the worker closed our stdin
        self.buffer += chunk
        return True

    def _missing(self) -> int:
        if len(self.buffer) < FRAME.size:
            return 0
        header_size, body_size = FRAME.unpack_from(self.buffer)
        return FRAME.size + header_size + body_size - len(self.buffer)

    def complete(self) -> tuple[dict, bytes] | None:
        """The next frame if the buffer holds all of it, else None."""
        if len(self.buffer) < FRAME.size:
            return None
        header_size, body_size = FRAME.unpack_from(self.buffer)
        end = FRAME.size + header_size + body_size
        if len(self.buffer) < end:
            return None
        header = fast_json.loads(self.buffer[FRAME.size:FRAME.size + header_size])
        body = bytes(self.buffer[FRAME.size + header_size:end])
        del self.buffer[:end]
        return header, body

    def frame(self) -> tuple[dict, bytes] | None:
        """The next frame, None at end of file."""
        while True:
            frame = self.complete()
            if frame is not None:
                return frame
            if not self.read():
                return None


def encode_frame(header: dict, body: bytes = b"") -> bytes:
    encoded = fast_json.dumps(header)
    return FRAME.pack(len(encoded), len(body)) + encoded + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def address_space() -> int | None:
    """This process's virtual size in bytes (Linux), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _text(value: str, limit: int) -> bytes:
    """``value`` as UTF-8 of at most ``limit`` bytes (an error message may be anything)."""
    data = value.encode("utf-8", "surrogatepass")
    return data if len(data) <= limit else data[:max(limit - 3, 0)] + b"..."


class Child:
    """The engine, and what one script changes that the next must not see."""

    def __init__(self, engine: Any, home: str) -> None:
        from circles.worker import engine_api as engines  # after sys.path is the worker's

        self.engines = engines
        self.engine = engine
        self.home = home
        self.base_environment = dict(os.environ)  # the worker's allow-list (passed_environment)
        self.work: str | None = None  # the next script's directory, when the last one left it empty
        self.settled: tuple | None = None  # its lstat when found empty, long after its last change
        import resource

        self.hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)[1]  # only this process could lower it
        self.cpu_limit: int | None = None  # the soft RLIMIT_CPU set last
        self.baseline: int | None = None  # its address space once the engine was loaded
        self.limit: int | None = None  # RLIMIT_AS set from it
        self.broken = False  # an engine raised other than EngineError: this child runs no more
        self.environment: dict[str, str] | None = None  # what the last script was given
        self.environment_seen: dict | None = None  # os.environ's own data then

    def run(self, header: dict, body: bytes) -> bytes:
        """One script: the reply frame, or :data:`MEMORY` when the address space ran out."""
        import resource

        engines = self.engines
        context = engines.ScriptContext(**header["context"])
        limit = context.max_output if context.max_output is not None else engines.DEFAULT_MAX_OUTPUT
        if header.get("cpu"):
            # A backstop to the worker's SIGKILL at the deadline: SIGXCPU once this script has
            # used as much CPU as it had time (the limit counts the process's whole life). In
            # whole seconds, so that it changes (a system call) once a second of CPU at most.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            soft = math.ceil(usage.ru_utime + usage.ru_stime) + math.ceil(header["cpu"]) + 1
            if soft != self.cpu_limit and (self.hard_cpu == resource.RLIM_INFINITY or soft <= self.hard_cpu):
                resource.setrlimit(resource.RLIMIT_CPU, (soft, self.hard_cpu))
                self.cpu_limit = soft
        if self.work is None:
            os.makedirs(self.home, 0o700, exist_ok=True)  # a script may have removed it
            self.work = tempfile.mkdtemp(prefix="script-", dir=self.home)
        work = self.work
        os.chdir(work)
        environment = dict(self.base_environment, HOME=work, TMPDIR=work, **context.environment())
        self._set_environment(environment)
        tempfile.tempdir = work
        out_of_memory = False
        try:
            reply = self._attempt(context, body.decode("utf-8", "surrogatepass"), limit)
        except MemoryError:
            out_of_memory = True  # out of the except clause: the script's values are freed
            reply = b""
        tempfile.tempdir = None
        if not self._untouched(work):
            os.chdir("/")  # not in what goes (its home may be gone already)
            shutil.rmtree(work, ignore_errors=True)
            self.work = self.settled = None  # the next script gets a new one
        return MEMORY if out_of_memory else reply

    def _untouched(self, work: str) -> bool:
        """Whether a script left its directory as it found it (empty, private): then the next one
        may have it, and a script's start costs no mkdir and rmdir (0.15 ms on a journalled disk).

        A directory found empty :data:`SETTLED` seconds after its last change is not listed again
        while its ``lstat`` stays the same: any entry added or removed, and any change of its mode,
        sets its ctime to the time of that change, later than the one seen, and no process can set
        a ctime back. Listing it (open, getdents, close) took five system calls a script."""
        try:
            info = os.lstat(work)
        except OSError:
            return False
        seen = (info.st_dev, info.st_ino, info.st_mode, info.st_nlink, info.st_mtime_ns, info.st_ctime_ns)
        if seen == self.settled:
            return True
        if not (stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700):
            return False
        try:
            if os.listdir(work):
                return False
        except OSError:
            return False
        # The file system's clock, not a scheduler's: the timestamps a change would write.
        settled = time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) > SETTLED * 1e9
        self.settled = seen if settled else None
        return True

    def _set_environment(self, wanted: dict[str, str]) -> None:
        """``os.environ`` made ``wanted``, changing only what differs (what the previous script's
        context set, or an engine changed). When the engine changed nothing (``os.environ``'s
        data is as the last script got it: one comparison of two dicts of bytes), only what
        differs from that script's is changed, not every variable read and decoded again."""
        data = getattr(os.environ, "_data", None)  # CPython's os._Environ keeps its bytes there
        given = self.environment
        if given is None or data is None or data != self.environment_seen:
            given = dict(os.environ)
        for name in [name for name in given if name not in wanted]:
            del os.environ[name]
        for name, value in wanted.items():
            if given.get(name) != value:
                os.environ[name] = value
        self.environment = wanted
        self.environment_seen = dict(data) if data is not None else None

    def _attempt(self, context: Any, script: str, limit: int) -> bytes:
        engines = self.engines
        try:
            output = self._as_text(self.engine(script, context))
            size = engines.output_size(output)
            if size > limit:
                raise engines.OutputTooLarge(limit, size)
            return encode_frame({"kind": "done"}, output.encode("utf-8", "surrogatepass"))
        except MemoryError:
            raise
        except engines.OutputTooLarge as e:
            return encode_frame({"kind": "error", "type": "engine", "reason": e.reason, "limit": e.limit,
                                 "size": e.size}, _text(str(e), limit))
        except engines.EngineError as e:
            # The body is the error, then what the script printed before it (its "output" bytes),
            # the two within the output cap together.
            error = _text(str(e), limit)
            printed = engines.output_before_error(e.output, error.decode("utf-8", "ignore"), limit)
            printed_bytes = printed.encode("utf-8", "surrogatepass")
            return encode_frame({"kind": "error", "type": "engine", "reason": e.reason,
                                 "output": len(printed_bytes)}, error + printed_bytes)
        except BaseException as e:  # an engine's bug (or exit): the worker says it as it does in-process
            self.broken = True
            trace = "".join(traceback.format_exception(e))[-MAX_TRACEBACK:]
            return encode_frame({"kind": "error", "type": "exception", "name": type(e).__name__,
                                 "traceback": trace}, _text(str(e), limit))

    def _as_text(self, output: Any) -> str:
        """What the worker does with an engine's result (service.py), and a Deferred's result."""
        defer = sys.modules.get("twisted.internet.defer")
        if defer is not None and isinstance(output, defer.Deferred):
            box: list = []
            output.addBoth(box.append)
            if not box:
                raise self.engines.EngineError(
                    "the engine's Deferred had not fired when it returned: an engine under --isolation process "
                    "answers before it returns (use --isolation none for one that waits)")
            output = box[0]
            if isinstance(output, sys.modules["twisted.python.failure"].Failure):
                output.raiseException()
        if output is None:
            return ""
        if isinstance(output, bytes):
            return output.decode("utf-8", "replace")
        if not isinstance(output, str):
            raise self.engines.EngineError(f"the engine returned {type(output).__name__}, not a string")
        return output


#: The reply to a script that ran out of memory, made before any script ran: sending it must not
#: need memory the script took.
MEMORY = encode_frame({"kind": "error", "type": "memory"})


class Loop:
    """The tasks read and not started yet, run one after the other, and :data:`GIVE_BACK`."""

    def __init__(self, child: Child, reader: Reader, out: int) -> None:
        self.child = child
        self.reader = reader
        self.out = out
        self.pending: deque[tuple[dict, bytes]] = deque()
        self.epoch = 0  # take-backs so far: tasks sent before the last one are dropped
        self.started = 0
        self.stopped = False  # after an engine's exception or memory error: no task starts
        self.guarded = True  # GIVE_BACK waits (asked) but while a script runs or a read waits
        self.asked = False

    def give_back(self, signum: int, frame: Any) -> None:
        """The signal's handler: drop the tasks not started, say how many started; or, where the
        loop is between frames (:meth:`_open` and :meth:`_close`), once it is out of there.

        A flag, not the signal mask: Python runs a handler only between two bytecodes of this
        thread, so a flag read there is as safe as a blocked signal, and costs no system call
        (blocking and unblocking took four ``rt_sigprocmask`` a script)."""
        if self.guarded:
            self.asked = True
            return
        self.guarded = True
        try:
            self.epoch += 1
            self.pending.clear()
            write_all(self.out, encode_frame({"kind": "returned", "started": self.started}))
        finally:
            self.guarded = False

    def _open(self) -> None:
        """Let :data:`GIVE_BACK` in (a script runs, or a read waits), answering one that came."""
        self.guarded = False
        if self.asked:
            self.asked = False
            self.give_back(GIVE_BACK, None)

    def _close(self) -> None:
        self.guarded = True

    def serve(self) -> int:
        signal.signal(GIVE_BACK, self.give_back)
        write_all(self.out, encode_frame({"kind": "ready", "pid": os.getpid(), "baseline": self.child.baseline,
                                          "limit": self.child.limit}))
        while True:
            if not self.pending:
                while (frame := self.reader.complete()) is not None:
                    header = frame[0]
                    if header.get("kind") == "task" and header.get("epoch", 0) == self.epoch and not self.stopped:
                        self.pending.append(frame)
            if not self.pending:
                self._open()
                try:
                    more = self.reader.read()
                finally:
                    self._close()
                if not more:
                    return 0
                continue
            header, body = self.pending.popleft()
            self.started += 1
            self._open()
            try:
                reply = self.child.run(header, body)
            except MemoryError:
                reply = MEMORY
            finally:
                self._close()
            write_all(self.out, reply)
            if reply is MEMORY or self.child.broken:
                self.stopped = True  # it is replaced: what it holds goes to another child
                self.pending.clear()


def main() -> int:
    protocol_in, protocol_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # print() in an engine goes to stderr, never into a frame
    os.close(null)
    reader = Reader(protocol_in)
    frame = reader.frame()
    if frame is None:
        return 0
    init = frame[0]
    sys.path[:] = list(init["path"]) + [entry for entry in sys.path if entry not in init["path"]]
    home = os.getcwd()
    from circles.worker.engine_api import load_engine

    try:
        engine = load_engine(init["spec"])
    except ValueError as e:
        write_all(protocol_out, encode_frame({"kind": "failed"}, str(e).encode("utf-8", "replace")))
        return 1
    child = Child(engine, home)
    baseline, limit = address_space(), None
    if init.get("max_memory") and baseline is not None:
        import resource

        limit = baseline + int(init["max_memory"])
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    child.baseline, child.limit = baseline, limit
    return Loop(child, reader, protocol_out).serve()


if __name__ == "__main__":
    sys.exit(main())
