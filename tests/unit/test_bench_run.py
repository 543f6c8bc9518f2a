"""bench/run.py's bookkeeping: the interleaved order of the targets, one server per target for the
throughput rounds and a fresh one per memory measurement, medians over the rounds, the ratios
against the goals, pinning and the choice of load generator. The servers and the load generator
are stood in for here (they are processes: tests/integration/test_bench_node.py runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run


def test_each_round_rotates_the_order_so_every_target_runs_once_in_every_position():
    order = run.schedule(["ours", "autobahn", "websockets"], 3)
    assert order == [["ours", "autobahn", "websockets"], ["autobahn", "websockets", "ours"],
                     ["websockets", "ours", "autobahn"]]
    for position in range(3):
        assert sorted(r[position] for r in order) == ["autobahn", "ours", "websockets"]
    assert run.schedule(["a", "b"], 5) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"], ["a", "b"]]
    assert run.schedule(["a", "b", "c"], 1) == [["a", "b", "c"]]
    assert run.schedule([], 3) == []


def test_interleave_runs_each_measurement_round_by_round_over_its_targets():
    first = run.Measurement("fetch_nonce_x1", "rpc", (), 10, False)
    second = run.Measurement("idle", "idle", (), 10, True)
    calls = []

    def measure(target, m, r):
        calls.append((m.key, r, target))
        return {"ops_per_s": len(calls)}

    raw = run.interleave([first, second], lambda m: ["a", "b", "c"] if m is first else ["a", "b"], 2, measure)
    assert calls == [("fetch_nonce_x1", 0, "a"), ("fetch_nonce_x1", 0, "b"), ("fetch_nonce_x1", 0, "c"),
                     ("fetch_nonce_x1", 1, "b"), ("fetch_nonce_x1", 1, "c"), ("fetch_nonce_x1", 1, "a"),
                     ("idle", 0, "a"), ("idle", 0, "b"), ("idle", 1, "b"), ("idle", 1, "a")]
    # Each target's rounds in the order they ran.
    assert raw["a"]["fetch_nonce_x1"] == [{"ops_per_s": 1}, {"ops_per_s": 6}]
    assert raw["c"] == {"fetch_nonce_x1": [{"ops_per_s": 3}, {"ops_per_s": 5}]}
    assert raw["b"]["idle"] == [{"ops_per_s": 8}, {"ops_per_s": 9}]


def test_combine_takes_the_median_of_every_figure_and_adds_up_the_errors():
    rounds = [{"workload": "rpc", "ops_per_s": 900.0, "p99_ms": 3.0, "server_cpu_us_per_op": 50.0, "errors": 1,
               "connections": 50, "last_error": "first"},
              {"workload": "rpc", "ops_per_s": 1200.0, "p99_ms": 1.0, "server_cpu_us_per_op": 40.0, "errors": 0,
               "connections": 50, "last_error": "second"},
              {"workload": "rpc", "ops_per_s": 1000.0, "p99_ms": 2.5, "server_cpu_us_per_op": 45.0, "errors": 2,
               "connections": 50, "last_error": "third"}]
    out = run.combine(rounds, "ops_per_s")
    assert out["ops_per_s"] == 1000.0
    assert out["p99_ms"] == 2.5
    assert out["server_cpu_us_per_op"] == 45.0
    assert out["connections"] == 50 and isinstance(out["connections"], int)
    assert out["errors"] == 3
    assert out["last_error"] == "third"  # the other fields are the median round's
    assert out["by_round"] == [900.0, 1200.0, 1000.0]
    assert (out["rounds_total"], out["rounds_ok"]) == (3, 3)


def test_combine_with_an_even_count_averages_the_middle_two_and_skips_failed_rounds():
    rounds = [{"ops_per_s": 100.0, "p50_ms": 1.0}, {"workload": "auth", "failed": "load generator exited 1"},
              {"ops_per_s": 300.0, "p50_ms": 2.0}]
    out = run.combine(rounds, "ops_per_s")
    assert out["ops_per_s"] == 200.0
    assert out["p50_ms"] == 1.5
    counts = run.combine([{"ops_per_s": 1.0, "opened": 1000}, {"ops_per_s": 2.0, "opened": 1000}], "ops_per_s")
    assert counts["opened"] == 1000 and isinstance(counts["opened"], int)  # not 1000.0
    halves = run.combine([{"ops_per_s": 1.0, "opened": 999}, {"ops_per_s": 2.0, "opened": 1000}], "ops_per_s")
    assert halves["opened"] == 999.5
    assert out["by_round"] == [100.0, None, 300.0]
    assert out["failed_rounds"] == ["load generator exited 1"]
    assert (out["rounds_total"], out["rounds_ok"]) == (3, 2)
    nothing = run.combine([{"failed": "load generator exited 1"}, {"failed": "load generator exited 1"}], "ops_per_s")
    assert nothing["failed"] == "load generator exited 1"
    assert "ops_per_s" not in nothing and nothing["rounds_ok"] == 0


def _medians(ours: list, websockets: list, autobahn: list) -> dict:
    results = {}
    for target, by_round in (("ours", ours), ("websockets", websockets), ("autobahn", autobahn)):
        rounds = [{"ops_per_s": v, "server_cpu_us_per_op": 1e6 / v, "server_cpu_util": 1.0, "p50_ms": 1.0,
                   "p99_ms": 2.0, "client_cpu_util": 0.5, "errors": 0} for v in by_round]
        results[target] = {"fetch_nonce_x50": run.combine(rounds, "ops_per_s")}
    return results


def test_ratios_are_of_the_medians_with_the_goals_marked_and_the_rounds_paired():
    results = _medians(ours=[1000.0, 1100.0, 1050.0], websockets=[1000.0, 1200.0, 1050.0],
                       autobahn=[880.0, 800.0, 900.0])
    row = run.ratios(results)["fetch_nonce_x50"]
    assert row["ours/websockets"] == 1.0  # 1050 / 1050: exactly the goal meets it
    assert row["meets ours/websockets"] is True and row["goal ours/websockets"] == 1.0
    assert row["ours/autobahn"] == 1.19  # 1050 / 880: below 1.2
    assert row["meets ours/autobahn"] is False and row["goal ours/autobahn"] == 1.2
    assert row["ours/websockets by round"] == [1.0, 0.92, 1.0]
    assert row["ours/autobahn by round"] == [1.14, 1.38, 1.17]
    assert row["cpu websockets/ours"] == 1.0
    assert run.ratio_mark(row, "websockets") == "1.0 ✓"
    assert run.ratio_mark(row, "autobahn") == "1.19 ✗"
    assert run.ratio_mark({}, "autobahn") == "n/a"


def test_a_ratio_just_short_of_its_goal_misses_it_and_does_not_print_as_the_goal():
    # 1504 / 1506 rounds to 1.0; it is 0.9987, short of the goal of 1.0.
    row = run.ratios(_medians(ours=[1504.0], websockets=[1506.0], autobahn=[1253.0]))["fetch_nonce_x50"]
    assert row["meets ours/websockets"] is False and row["ours/websockets"] == 0.99
    assert run.ratio_mark(row, "websockets") == "0.99 ✗"
    assert row["meets ours/autobahn"] is True and row["ours/autobahn"] == 1.2  # 1.2003: meets, printed 1.2
    row = run.ratios(_medians(ours=[1199.6], websockets=[1000.0], autobahn=[1000.0]))["fetch_nonce_x50"]
    assert row["meets ours/autobahn"] is False and run.ratio_mark(row, "autobahn") == "1.19 ✗"  # not "1.2 ✗"


def test_no_ratio_without_both_figures():
    results = _medians(ours=[1000.0], websockets=[1000.0], autobahn=[1000.0])
    results["autobahn"]["fetch_nonce_x50"] = run.combine([{"failed": "load generator exited 1"}], "ops_per_s")
    row = run.ratios(results)["fetch_nonce_x50"]
    assert "ours/autobahn" in run.ratios(_medians([1.0], [1.0], [1.0]))["fetch_nonce_x50"]
    assert "ours/autobahn" not in row and row["ours/websockets"] == 1.0


def _report(results: dict, rounds: int) -> dict:
    return {"date": "2026-01-01T000000", "mode": "quick", "rounds": rounds, "command": "bench/run.py --quick",
            "pinning": "Servers pinned to CPU 0, load generator to CPU 1", "pinned": True,
            "generator": {"name": "node", "versions": {"node": "20"}, "why": "test"},
            "machine": {"cpu_model": "cpu", "logical_cpus": 2, "mem_total_gb": 1.0, "kernel": "6", "python": "3.11",
                        "implementation": "CPython", "versions": {}, "git_commit": "abc", "git_dirty": False,
                        "loadavg_start": (2.5, 2.0, 1.0)},
            "loadavg_end": (3.0, 2.0, 1.0), "results": results, "ratios": run.ratios(results)}


def test_the_report_heads_with_the_ratios_the_goals_and_the_busy_machine():
    results = _medians(ours=[1000.0, 1100.0, 1050.0], websockets=[1000.0, 1200.0, 1050.0],
                       autobahn=[880.0, 800.0, 900.0])
    text = run.markdown(_report(results, 3))
    head, _, rest = text.partition("## Throughput")
    assert "Command: `bench/run.py --quick`" in head
    assert "a busy machine" in head  # load average 2.5 at the start
    assert "Load generator: node" in head
    assert "median of 3 interleaved round(s)" in head
    assert "| fetch_nonce, 50 connections | 1.0 ✓ | 1.19 ✗ | 1.0 0.92 1.0 | 1.14 1.38 1.17 |" in head
    assert "rounds: 1,000 · 1,100 · 1,050" in rest
    assert "## Memory" not in text  # no memory workload ran


def test_run_benchmark_keeps_one_server_per_target_for_throughput_and_a_fresh_one_per_memory_round(monkeypatch):
    started, stopped, generated = [], [], []

    class FakeServer:
        """Stands in for a server process: records when it starts and stops."""

        def __init__(self, target, logdir, pinning):
            self.target, self.pid, self.port = target, 1000 + len(started), 0
            started.append(target)

        def stop(self):
            stopped.append(self.target)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stop()

    figures = {"ours": 1100.0, "ours-2p": 1500.0, "autobahn": 900.0, "websockets": 1000.0}

    def fake_loadgen(generator, server, workload, args, pinning, timeout):
        generated.append((workload, server.target, server.pid))
        if workload == "idle":
            return {"workload": "idle", "server_bytes_per_idle_conn": 10240, "errors": 0}
        return {"workload": workload, "ops_per_s": figures[server.target] + len(generated), "errors": 0}

    monkeypatch.setattr(run, "Server", FakeServer)
    monkeypatch.setattr(run, "loadgen", fake_loadgen)
    monkeypatch.setattr(run, "log", lambda message: None)
    plan = dict(run.PLANS["quick"])
    targets = ["ours", "autobahn", "websockets", "ours-2p"]
    medians, raw = run.run_benchmark(targets, plan, 2, {"rpc", "idle"}, run.python_generator("test"),
                                     run.choose_pinning(True), Path("/nonexistent"))
    # Four throughput servers, started once and all stopped; then a fresh server for each of
    # the 2 rounds of idle for each target but the variant.
    assert started[:4] == targets
    assert sorted(started[4:]) == sorted(["ours", "autobahn", "websockets"] * 2)
    assert sorted(stopped) == sorted(started)
    rpc_pids = {(t, pid) for w, t, pid in generated if w == "rpc"}
    assert len(rpc_pids) == 4  # every rpc round of a target on its one server
    idle_pids = [pid for w, t, pid in generated if w == "idle"]
    assert len(idle_pids) == len(set(idle_pids)) == 6
    assert set(raw["ours-2p"]) == {"fetch_nonce_x1", "fetch_nonce_x50", "whoami_x1", "whoami_x50"}
    assert len(raw["ours"]["whoami_x50"]) == 2 and len(raw["ours"]["idle"]) == 2
    assert medians["ours"]["idle"]["server_bytes_per_idle_conn"] == 10240
    ours = raw["ours"]["fetch_nonce_x1"]
    assert medians["ours"]["fetch_nonce_x1"]["ops_per_s"] == (ours[0]["ops_per_s"] + ours[1]["ops_per_s"]) / 2
    # The first round runs the targets in the order given, the second starts with the next one.
    first_rpc = [t for w, t, _ in generated if w == "rpc"][:8]
    assert first_rpc == ["ours", "autobahn", "websockets", "ours-2p", "autobahn", "websockets", "ours-2p", "ours"]


def test_pinning_takes_two_cpus_this_process_may_use_or_says_why_not():
    pinning = run.choose_pinning(False, affinity={5, 3, 7}, taskset="/usr/bin/taskset")
    assert (pinning.server, pinning.client, pinning.enabled) == ("3", "5", True)
    assert pinning.server_argv(["srv"]) == ["taskset", "-c", "3", "srv"]
    assert pinning.client_argv(["gen"]) == ["taskset", "-c", "5", "gen"]
    assert pinning.server_argv(["srv"], "ours-2p") == ["srv"]  # two processes: both cores
    assert pinning.client_argv(["gen"], "ours-2p") == ["gen"]
    one = run.choose_pinning(False, affinity={1}, taskset="/usr/bin/taskset")
    assert not one.enabled and one.server_argv(["srv"]) == ["srv"] and "only CPU 1" in one.note
    none = run.choose_pinning(False, affinity={0, 1}, taskset=None)
    assert not none.enabled and "no taskset" in none.note
    assert run.choose_pinning(True).note == "Not pinned (--no-pin)"


def test_without_node_the_generator_is_python_unless_node_was_asked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no node
    chosen = run.choose_generator("auto")
    assert chosen.name == "python" and chosen.command[-1].endswith("bench/loadgen.py")
    assert "no node on PATH" in chosen.why
    assert run.choose_generator("python").name == "python"
    with pytest.raises(SystemExit, match="--generator node: no node on PATH"):
        run.choose_generator("node")


def test_bad_arguments_are_refused_before_anything_starts(capsys):
    for argv, message in ((["--rounds", "0"], "--rounds must be 1 or more"),
                          (["--targets", "ours,nginx"], "--targets: unknown ['nginx']"),
                          (["--workloads", "rpc,play"], "--workloads: choose from")):
        with pytest.raises(SystemExit) as exited:
            run.main(argv)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_a_checkout_is_dirty_by_its_code_not_by_the_results_of_earlier_runs(monkeypatch, tmp_path):
    """A run's own result files, written into bench/results, marked the next run "dirty"."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for name in ("circles/a.py", "bench/run.py", "bench/results/old.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "start")
    monkeypatch.setattr(run, "ROOT", tmp_path)
    assert run.machine_info()["git_dirty"] is False
    (tmp_path / "bench/results/2026-12-08T000000.json").write_text("{}")
    (tmp_path / "bench/results/old.md").write_text("y\n")
    assert run.machine_info()["git_dirty"] is False
    (tmp_path / "bench/run.py").write_text("y\n")
    assert run.machine_info()["git_dirty"] is True
