"""The Node load generator (bench/node/loadgen.mjs: ws and tiny-secp256k1) against real servers,
as bench/run.py starts them: `twistd -n circles` with the benchmark's flags and the two peers. An
auth workload without errors means every server accepted the generator's EIP-191 signatures.
Needs node and the npm packages (scripts/setup --with-npm)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import run

NO_PIN = run.choose_pinning(True)


def loadgen(*args) -> dict:
    done = subprocess.run(["node", str(run.NODE_LOADGEN), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=str(run.ROOT))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_node_generator_has_its_packages():
    versions = loadgen("--check")
    assert versions["ws"] and versions["tiny-secp256k1"] and versions["@noble/hashes"], versions
    chosen = run.choose_generator("auto")
    assert chosen.name == "node" and chosen.command[-1] == str(run.NODE_LOADGEN)


@pytest.mark.parametrize("target", ["ours", "autobahn", "websockets"])
def test_rpc_and_auth_from_node_are_answered_without_errors(tmp_path, target):
    with run.Server(target, tmp_path, NO_PIN) as server:
        for method in ("fetch_nonce", "whoami"):
            rpc = loadgen("rpc", "--url", server.url, "--method", method, "--connections", 2, "--duration", 1,
                          "--warmup", 0.2, "--server-pid", server.pid)
            assert (rpc["workload"], rpc["method"], rpc["generator"], rpc["connections"]) == ("rpc", method, "node", 2)
            assert rpc["ops"] > 0 and rpc["ops_per_s"] > 0, rpc
            assert rpc["errors"] == 0, rpc
            assert 0 < rpc["p50_ms"] <= rpc["p99_ms"] <= rpc["max_ms"]
            assert rpc["server_cpu_us_per_op"] > 0 and rpc["listen_overflows"] >= 0
        auth = loadgen("auth", "--url", server.url, "--concurrency", 4, "--duration", 1, "--warmup", 0.2,
                       "--server-pid", server.pid)
        assert auth["workload"] == "auth" and auth["concurrency"] == 4
        assert auth["ops"] > 0, auth
        assert auth["errors"] == 0, auth.get("last_error")  # every signature was accepted
        assert auth["client_sign_us"] > 0 and auth["server_cpu_us_per_op"] > 0


def test_threads_split_the_connections_and_add_up(tmp_path):
    with run.Server("ours", tmp_path, NO_PIN) as server:
        rpc = loadgen("rpc", "--url", server.url, "--connections", 3, "--procs", 2, "--duration", 1, "--warmup", 0.2,
                      "--server-pid", server.pid)
        auth = loadgen("auth", "--url", server.url, "--concurrency", 2, "--procs", 2, "--duration", 1,
                       "--warmup", 0.2)
    assert (rpc["procs"], rpc["connections"], rpc["errors"]) == (2, 3, 0)
    assert rpc["ops"] > 0 and rpc["server_cpu_us_per_op"] > 0
    assert (auth["procs"], auth["errors"]) == (2, 0) and auth["ops"] > 0


def test_idle_and_churn_from_node_hold_and_close_every_connection(tmp_path):
    with run.Server("ours", tmp_path, NO_PIN) as server:
        idle = loadgen("idle", "--url", server.url, "--count", 40, "--batch", 10, "--hold", 0.2, "--settle", 0.1,
                       "--server-pid", server.pid)
        churn = loadgen("churn", "--url", server.url, "--rounds", 2, "--per-round", 30, "--concurrency", 5,
                        "--settle", 0.1, "--server-pid", server.pid)
    assert (idle["opened"], idle["open_failures"], idle["alive_after_hold"]) == (40, 0, 40), idle
    assert idle["server_rss_open_mb"] > 0 and "server_bytes_per_idle_conn" in idle
    assert (churn["rounds"], churn["per_round"], churn["errors"]) == (2, 30, 0), churn
    assert [r["round"] for r in churn["per_round_results"]] == [1, 2]
    assert churn["server_rss_last_mb"] > 0


def test_bad_arguments_get_a_usage_error():
    for args, message in ((["rpc"], "--url ws://host:port is required"),
                          (["rpc", "--url", "ws://127.0.0.1:1", "--method", "play"], "--method: fetch_nonce or whoami"),
                          (["rpc", "--url", "ws://127.0.0.1:1", "--connections", "many"], "--connections: expected"),
                          (["rpc", "--url", "ws://127.0.0.1:1", "--bogus"], "Unknown option '--bogus'"),
                          (["dance", "--url", "ws://127.0.0.1:1"], "usage: loadgen.mjs")):
        done = subprocess.run(["node", str(run.NODE_LOADGEN), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "\n    at " not in done.stderr  # a message, not a stack trace
        assert done.stdout == ""


def test_one_command_interleaves_the_servers_and_prints_the_ratios(tmp_path):
    """bench/run.py with the Node generator: two rounds, two servers, auth only, quick counts."""
    done = subprocess.run([sys.executable, str(run.HERE / "run.py"), "--quick", "--targets", "ours,websockets",
                           "--workloads", "auth", "--rounds", "2", "--no-profile", "--no-pin",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(run.ROOT))
    assert done.returncode == 0, done.stderr
    assert "load generator: node" in done.stderr
    order = [line.split("auth_x20 ")[1].split(":")[0] for line in done.stderr.splitlines() if "auth_x20 " in line]
    assert order == ["ours", "websockets", "websockets", "ours"]  # round 2 starts with the other one
    assert "ours/websockets (goal >= 1.0)" in done.stdout
    [report_file] = tmp_path.glob("*-quick.json")
    report = json.loads(report_file.read_text())
    assert report["generator"]["name"] == "node" and report["rounds"] == 2
    for target in ("ours", "websockets"):
        result = report["results"][target]["auth_x20"]
        assert result["rounds_ok"] == 2 and result["errors"] == 0 and result["generator"] == "node", result
        assert len(report["raw"][target]["auth_x20"]) == 2
    row = report["ratios"]["auth_x20"]
    assert len(row["ours/websockets by round"]) == 2
    assert row["meets ours/websockets"] == (row["ours/websockets"] >= 1.0)
    assert f"| auth handshakes, 20 concurrent | {run.ratio_mark(row, 'websockets')} |" in done.stdout


def test_play_through_a_worker_from_node(tmp_path):
    """bench/play.py with the Node generator: a server with --auth, its Redis, a worker; every
    connection authenticates, then plays."""
    done = subprocess.run([sys.executable, "-m", "bench.play", "--connections", "3", "--seconds", "1", "--warmup", "0.5",
                           "--concurrency", "2", "--generator", "node"],
                          capture_output=True, text=True, timeout=300, cwd=str(run.ROOT))
    assert done.returncode == 0, done.stderr
    assert "load generator: node" in done.stderr
    result = json.loads(done.stdout)
    assert result["generator"]["name"] == "node" and result["connections"] == 3
    assert result["plays"] > 0 and result["plays_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["worker_cpu_us_per_play"] > 0  # the window was signalled and the worker's CPU taken over it
    ratios = result["cpu_per_generator_cpu"]
    assert ratios["total"] == pytest.approx(result["cpu_us_per_play"]["total"] / result["cpu_us_per_play"]["generator"],
                                            abs=0.01)


def test_play_at_a_set_rate_from_node(tmp_path):
    """bench/play.py --rate: an open loop of 100 plays a second over 4 connections, whatever the
    replies; the plays answered in the window come to that rate, none held back."""
    done = subprocess.run([sys.executable, "-m", "bench.play", "--connections", "4", "--seconds", "2", "--warmup", "0.5",
                           "--concurrency", "2", "--generator", "node", "--rate", "100"],
                          capture_output=True, text=True, timeout=300, cwd=str(run.ROOT))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["rate"], result["behind"]) == (100, 0), result
    assert 150 <= result["plays"] <= 250, result  # 2 s at 100 a second, counted by the replies
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["worker_cpu_us_per_play"] > 0
