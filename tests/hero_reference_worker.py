"""A hero worker written from the documented protocol alone (docs/worker-protocol.md, "The hero
dispatcher protocol"), not from our code: it imports nothing of circles and speaks Redis with
redis-py. The tests run it as a process to play the part of the ecosystem's Rust workers.

    python tests/hero_reference_worker.py --port 6379 --circle <pk> [--ignore-stops]

As upstream documents: it ``BLPOP``s job ids from ``hero:work_queue:{circle}``, reads the hash
``hero:job:{id}``, sets ``status`` ``started``, runs the script, writes ``output`` (``finished``)
or ``error`` (``error``) with ``updated_at`` in one HSET, and pushes the job id on
``hero:reply:{id}``. While a script runs it reads ``hero:stop_queue:{circle}``; a stop request
for its job ends it (status ``error``). It runs a tiny language, one statement per script:

- an integer expression of ``+ - * // %`` and parentheses: ``40 + 2`` answers ``42``;
- ``echo(TEXT)``: TEXT; ``env(NAME)``: that variable of the job's ``env_vars``;
  ``caller()``, ``context()``: ``caller_id``, ``context_id``;
- ``sleep(SECONDS)``: sleeps (stoppable), answers ``slept``;
- ``fail(TEXT)``: an error, TEXT.

Each step is a line on stdout: ``job <id> <fields as JSON>`` when it took a job (what the
dispatcher wrote), ``finished <id>``, ``failed <id>``, ``stop <id>`` for each stop request read,
``stopped <id>`` when one stopped its job. ``--ignore-stops`` leaves the stop queue alone.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import operator
import sys
import time

import redis

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
             ast.Mod: operator.mod}


class Stopped(Exception):
    pass


class ScriptError(Exception):
    pass


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def say(*words) -> None:
    print(*words, flush=True)


class ReferenceWorker:
    def __init__(self, port: int, circle: str, ignore_stops: bool) -> None:
        self.redis = redis.Redis(port=port, decode_responses=True)
        self.circle = circle
        self.ignore_stops = ignore_stops
        self.queue = f"hero:work_queue:{circle}"
        self.stop_queue = f"hero:stop_queue:{circle}"

    def run(self) -> None:
        while True:
            taken = self.redis.blpop([self.queue], timeout=1)
            if taken:
                self.run_job(taken[1])
            else:
                self.read_stops(None)

    def read_stops(self, running: str | None) -> None:
        """Stop requests: job ids on the stop queue. Ours, if one names it; others are not ours."""
        if self.ignore_stops:
            return
        while (job_id := self.redis.lpop(self.stop_queue)) is not None:
            say("stop", job_id)
            if job_id == running:
                raise Stopped()

    def run_job(self, job_id: str) -> None:
        key = f"hero:job:{job_id}"
        job = self.redis.hgetall(key)
        say("job", job_id, json.dumps(job, sort_keys=True))
        if job.get("status") != "dispatched":
            return
        self.redis.hset(key, mapping={"status": "started", "updated_at": now()})
        try:
            output = self.evaluate(job_id, job)
        except Stopped:
            self.redis.hset(key, mapping={"status": "error", "error": "stopped by request", "updated_at": now()})
            say("stopped", job_id)
        except ScriptError as e:
            self.redis.hset(key, mapping={"status": "error", "error": str(e), "updated_at": now()})
            say("failed", job_id)
        else:
            self.redis.hset(key, mapping={"status": "finished", "output": output, "updated_at": now()})
            say("finished", job_id)
        self.redis.lpush(f"hero:reply:{job_id}", job_id)
        self.redis.expire(f"hero:reply:{job_id}", 300)

    def evaluate(self, job_id: str, job: dict) -> str:
        script = job.get("script", "").strip()
        call = script.partition("(")
        name, argument = call[0].strip(), call[2].rstrip()[:-1] if call[1] else ""
        if name == "echo":
            return argument
        if name == "env":
            return str(json.loads(job.get("env_vars") or "{}").get(argument, ""))
        if name == "caller" and not argument:
            return job.get("caller_id", "")
        if name == "context" and not argument:
            return job.get("context_id", "")
        if name == "fail":
            raise ScriptError(argument)
        if name == "sleep":
            until = time.monotonic() + float(argument)
            while time.monotonic() < until:
                self.read_stops(job_id)
                time.sleep(0.05)
            return "slept"
        try:
            return str(self.arithmetic(ast.parse(script, mode="eval").body))
        except (SyntaxError, ValueError, ZeroDivisionError) as e:
            raise ScriptError(f"cannot run {script!r}: {e}") from None

    def arithmetic(self, node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](self.arithmetic(node.left), self.arithmetic(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.arithmetic(node.operand)
        raise ValueError("not an integer expression")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--circle", required=True)
    parser.add_argument("--ignore-stops", action="store_true")
    args = parser.parse_args()
    say("ready")
    try:
        ReferenceWorker(args.port, args.circle, args.ignore_stops).run()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
