"""Engines for tests/integration/test_isolation.py, in a module of their own: each isolated child imports it."""

from __future__ import annotations

import json
import os
import time


def echo(script, context):
    """The script back, with the child's pid: which process ran it."""
    return f"{os.getpid()}:{script}"


def spin(script, context):
    """Busy for 60 s unless the script is "quick": what no cooperative check can stop."""
    if script == "quick":
        return "quick"
    until = time.monotonic() + 60
    while time.monotonic() < until:
        pass
    return "spun for 60 s"


def allocate(script, context):
    """Reserve memory, 10 MB a step, up to 1 GiB (untouched pages: it costs no RAM), unless "quick"."""
    if script == "quick":
        return "quick"
    held = []
    while len(held) < 100:
        held.append(bytes(10_000_000))
    return f"held {len(held) * 10_000_000} bytes"


def environment(script, context):
    """What the script could read: its environment, working directory (and what is in it) and
    context; the script "litter" leaves a file there, "litter-hidden" too and sets the directory's
    mtime back."""
    seen = {"environ": dict(os.environ), "cwd": os.getcwd(), "files": os.listdir("."),
            "mode": os.stat(".").st_mode & 0o777, "max_memory": context.max_memory,
            "max_output": context.max_output}
    if script in ("litter", "litter-hidden"):
        before = os.stat(".")
        with open("left-behind", "w") as f:
            f.write("for the next script?")
        if script == "litter-hidden":  # its directory's mtime as it was (its ctime cannot be set back)
            os.utime(".", ns=(before.st_atime_ns, before.st_mtime_ns))
    return json.dumps(seen)


def policy(script, context):
    """The scheduling policy the script runs under."""
    return str(os.sched_getscheduler(0))


def raises(script, context):
    raise ValueError(f"bad script {script!r}")


def dies(script, context):
    os._exit(3)


def big(script, context):
    return "x" * int(script)


def prints(script, context):
    print("noise on stdout " * 1000)
    return "fine"


def vandal(script, context):
    """Removes the directory its child keeps its scripts' directories in."""
    import shutil

    home = os.path.dirname(os.getcwd())
    shutil.rmtree(home)
    return "removed"


def fired(script, context):
    """A Deferred that has fired: what an engine written for the reactor may return."""
    from twisted.internet.defer import succeed

    return succeed(f"fired {script}")


def waits(script, context):
    """A Deferred nobody will fire in a child (no reactor runs there)."""
    from twisted.internet.defer import Deferred

    return Deferred()


def record(script, context):
    """``PATH:NAME`` appends NAME to the file PATH (what ran, and how often) and answers the
    child's pid; "spin" is busy for 60 s, "die" ends the child, "raise" is an engine's bug, ``PATH:deaf``
    ignores the take-back signal (SIGUSR1) from then on, and sleeps 2 s once it is written down."""
    if script == "spin":
        return spin(script, context)
    if script == "die":
        os._exit(3)
    if script == "raise":
        raise ValueError("a bug")
    path, name = script.rsplit(":", 1)
    if name == "deaf":  # an engine that takes the take-back signal for itself
        import signal

        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with open(path, "a") as f:
        f.write(name + "\n")
    if name == "deaf":
        time.sleep(2)
    return str(os.getpid())
