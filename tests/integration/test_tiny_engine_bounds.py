"""The tiny engine's worst attacks in a child process: its peak RSS stays within the budget.

Measured as quantities, never as times (the steps, bytes and allocations of each attack are in
tests/unit/test_tiny_engine_bounds.py). The attacks are the issue's: ``==`` between two
doubled 2^15-item arrays in a loop (106 s of a busy reactor before), and the text of an array
of 2^13 or 2^18 references to one 64 KiB string (512 MiB and 16 GiB of text; 1.0 to 1.6 GB
peaks, and an OOM kill).
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from circles.worker import tiny_engine
from circles.worker.tiny_engine import DEFAULT_MAX_MEMORY, MAX_STEPS

from ..unit.test_tiny_engine_bounds import EQ_LOOP, REFUSALS, shared_refs


def test_the_attacks_in_a_child_process_stay_under_the_budget():
    """Peak RSS of a process running all the attacks (the 2^18 ones included, which were an OOM
    kill): its baseline plus at most the memory budget. The child has an address-space limit of
    1 GiB, so that a regression fails here rather than on the machine."""
    attacks = [EQ_LOOP] + [shared_refs(times) + use for times in (13, 18)
                           for use in ("print(a)", "a.to_string()", "`${a}`", "debug(a)")]
    child = textwrap.dedent("""
        import json, resource, sys
        limit = 1 << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from circles.worker.engines import EngineError, ScriptContext
        from circles.worker.tiny_engine import Stats, run

        def vm(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

        baseline = vm("VmRSS")
        context = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws")
        results = []
        for script in json.loads(sys.stdin.read()):
            stats = Stats()
            try:
                run(script, context, stats)
                results.append(["ok", stats.steps, stats.memory])
            except EngineError as e:
                results.append([str(e), stats.steps, stats.memory])
        print(json.dumps({"baseline": baseline, "peak": vm("VmHWM"), "results": results}))
    """)
    done = subprocess.run([sys.executable, "-c", child], input=json.dumps(attacks), capture_output=True,
                          text=True, timeout=120, check=True, cwd=Path(tiny_engine.__file__).parents[3])
    report = json.loads(done.stdout)
    for message, steps, memory in report["results"]:
        assert message != "ok" and re.search(REFUSALS, message), message
        assert steps <= MAX_STEPS and memory <= DEFAULT_MAX_MEMORY
    assert report["peak"] < report["baseline"] + DEFAULT_MAX_MEMORY
    assert report["peak"] < 300 * 1024 * 1024
