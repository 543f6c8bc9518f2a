"""How a hero dispatcher learns that its jobs ended, four ways, with thousands waiting.

    python bench/hero_wake.py [--waiting 2000] [--rate 200] [--seconds 5]

Starts a private redis-server (devtools.redis_server) and keeps ``--waiting`` jobs waiting
(hashes ``hero:job:{id}``, status ``started``). A worker thread finishes ``--rate`` of them a
second as a hero worker does (``HSET status finished output ...``, then ``LPUSH
hero:reply:{id}``); each job the dispatcher sees finished is replaced by a new one, so as many
wait throughout. The dispatcher learns of the ends by:

- ``poll``: every 0.1 s, ``HGET status`` of each waiting job (pipelined): a command per job per tick;
- ``sweep``: every 0.1 s, one ``EVAL`` per 500 waiting jobs returning those that ended;
- ``blpop``: one ``BLPOP`` over the reply lists of every waiting job, issued again after each wake;
- ``notify``: keyspace notifications (``PSUBSCRIBE __keyspace@0__:hero:job:*``), one ``HGET``
  of the job notified.

For each: the commands the dispatcher sent a second to learn of ends, the commands Redis ran
a second (those a Lua step runs included; less the worker's two per job and the dispatcher's
two to replace each job seen), Redis's CPU (user +
system, of one core), and the time from the worker's ``HSET`` to the dispatcher knowing (p50,
p99); then the same with no job ending (``--rate 0``): what waiting alone costs. Prints a
Markdown table (docs/worker-protocol.md has one).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.redis_server import RedisProcess

TICK = 0.1
BATCH = 500
SWEEP = """
local ended = {}
for i, job in ipairs(KEYS) do
  if redis.call('HGET', job, 'status') ~= 'started' then ended[#ended + 1] = i end
end
return ended
"""


class Bench:
    def __init__(self, port: int, waiting: int, rate: float) -> None:
        self.port = port
        self.rate = rate
        self.r = redis.Redis(port=port, decode_responses=True)
        self.waiting: set[str] = set()
        self.order: collections.deque[str] = collections.deque()  # waiting jobs, oldest first: the worker's pick
        self.finished_at: dict[str, float] = {}  # by the worker
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.worker_commands = 0
        self.sent = 0  # commands the dispatcher sent to learn of ends (not its replacing of jobs)
        for _ in range(waiting):
            self.new_job()

    def new_job(self, client: redis.Redis | None = None) -> None:
        job_id = str(uuid.uuid4())
        (client or self.r).hset(f"hero:job:{job_id}", mapping={"status": "started", "script": "1"})
        with self.lock:
            self.waiting.add(job_id)
            self.order.append(job_id)

    def seen(self, job_id: str, client: redis.Redis) -> None:
        with self.lock:
            if job_id not in self.waiting:
                return
            self.waiting.discard(job_id)
            finished = self.finished_at.pop(job_id, None)
        if finished is not None:
            self.latencies.append(time.monotonic() - finished)
        client.delete(f"hero:job:{job_id}", f"hero:reply:{job_id}")
        self.new_job(client)

    def worker(self) -> None:
        client = redis.Redis(port=self.port, decode_responses=True)
        if not self.rate:
            return
        pause = 1 / self.rate
        next_at = time.monotonic()
        while not self.stop.is_set():
            with self.lock:
                job_id = self.order.popleft() if self.order else None
                if job_id is not None:
                    self.finished_at[job_id] = time.monotonic()
            if job_id is not None:
                client.hset(f"hero:job:{job_id}", mapping={"status": "finished", "output": "42"})
                client.lpush(f"hero:reply:{job_id}", job_id)
                self.worker_commands += 2
            next_at += pause
            time.sleep(max(0.0, next_at - time.monotonic()))

    # -- the four ways ---------------------------------------------------------------------------

    def poll(self) -> None:
        client = redis.Redis(port=self.port, decode_responses=True)
        while not self.stop.is_set():
            with self.lock:
                ids = list(self.waiting)
            pipe = client.pipeline(transaction=False)
            self.sent += len(ids)
            for job_id in ids:
                pipe.hget(f"hero:job:{job_id}", "status")
            for job_id, status in zip(ids, pipe.execute()):
                if status == "finished":
                    self.seen(job_id, client)
            time.sleep(TICK)

    def sweep(self) -> None:
        client = redis.Redis(port=self.port, decode_responses=True)
        script = client.register_script(SWEEP)
        while not self.stop.is_set():
            with self.lock:
                ids = list(self.waiting)
            for start in range(0, len(ids), BATCH):
                batch = ids[start:start + BATCH]
                self.sent += 1
                for index in script(keys=[f"hero:job:{j}" for j in batch]):
                    self.seen(batch[int(index) - 1], client)
            time.sleep(TICK)

    def blpop(self) -> None:
        client = redis.Redis(port=self.port, decode_responses=True)
        while not self.stop.is_set():
            with self.lock:
                ids = list(self.waiting)
            self.sent += 1
            taken = client.blpop([f"hero:reply:{j}" for j in ids], timeout=0.5)
            if taken:
                self.seen(taken[1], client)

    def notify(self) -> None:
        client = redis.Redis(port=self.port, decode_responses=True)
        client.config_set("notify-keyspace-events", "Khl")
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe("__keyspace@0__:hero:job:*")
        prefix = len("__keyspace@0__:hero:job:")
        while not self.stop.is_set():
            message = pubsub.get_message(timeout=0.5)
            if message is None:
                continue
            job_id = message["channel"][prefix:]
            with self.lock:
                waited = job_id in self.waiting
            if waited:
                self.sent += 1
            if waited and client.hget(f"hero:job:{job_id}", "status") == "finished":
                self.seen(job_id, client)
        pubsub.close()
        client.config_set("notify-keyspace-events", "")


def redis_numbers(client: redis.Redis) -> tuple[int, float]:
    stats, cpu = client.info("stats"), client.info("cpu")
    return int(stats["total_commands_processed"]), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def measure(port: int, way: str, waiting: int, rate: float, seconds: float) -> dict:
    bench = Bench(port, waiting, rate)
    threads = [threading.Thread(target=getattr(bench, way)), threading.Thread(target=bench.worker)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm up
    commands0, cpu0 = redis_numbers(bench.r)
    worker0, latencies0, sent0 = bench.worker_commands, len(bench.latencies), bench.sent
    start = time.monotonic()
    time.sleep(seconds)
    commands1, cpu1 = redis_numbers(bench.r)
    elapsed = time.monotonic() - start
    worker = bench.worker_commands - worker0
    sent = bench.sent - sent0
    latencies = bench.latencies[latencies0:]
    bench.stop.set()
    for t in threads:
        t.join()
    bench.r.flushall()
    # Less the worker's, the dispatcher's replacing of each job seen (DEL, HSET) and the two INFOs.
    per_second = (commands1 - commands0 - worker - 2 * len(latencies) - 2) / elapsed
    result = {"way": way, "waiting": waiting, "rate": rate, "commands_per_s": round(per_second), "sent_per_s": round(sent / elapsed),
              "redis_cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1), "ends_seen": len(latencies)}
    if latencies:
        ordered = sorted(latencies)
        result["latency_ms_p50"] = round(1000 * statistics.median(ordered), 1)
        result["latency_ms_p99"] = round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = RedisProcess(directory)
        server.start()
        try:
            rows = [measure(server.port, way, args.waiting, rate, args.seconds)
                    for rate in (args.rate, 0.0) for way in ("poll", "sweep", "blpop", "notify")]
        finally:
            server.kill()
    print("| way | waiting | ends/s | commands sent/s | Redis commands/s | Redis CPU | ends seen | latency p50 | "
          "latency p99 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['way']} | {row['waiting']} | {row['rate']:g} | {row['sent_per_s']} | {row['commands_per_s']} | "
              f"{row['redis_cpu_percent']}% | {row['ends_seen']} | {row.get('latency_ms_p50', '-')} ms | "
              f"{row.get('latency_ms_p99', '-')} ms |")


if __name__ == "__main__":
    main()
