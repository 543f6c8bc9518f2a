"""The package layout holds: each process loads only its own side of the seams.

Measured in a fresh interpreter: the modules in ``sys.modules`` once the statement ran (what
``python -X importtime`` lists too, except that it does not see modules loaded through
``importlib``, as the package's lazy attributes are). The layout as written down and the rules
of the code, read from the source: tests/unit/test_layout.py.
"""

import json
import subprocess
import sys

import pytest

#: What only the server loads: the gateway's own modules and the libraries of its edge.
SERVER = ("circles.service", "circles.server_tap", "circles.server.gateway", "circles.server.session.methods", "circles.protocol",
          "circles.server.config", "circles.webhooks", "circles.server.http", "circles.server.processes.group", "autobahn", "klein",
          "prometheus_client")


def imported(statement: str) -> set:
    """The modules loaded in a fresh interpreter once ``statement`` ran."""
    result = subprocess.run([sys.executable, "-c", f"{statement}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                            capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def printed(statement: str, *argv: str):
    """What ``statement``, run in a fresh interpreter (with ``argv``), printed last, as JSON."""
    result = subprocess.run([sys.executable, "-c", statement, *argv], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def loaded(names: set, prefixes) -> list:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("module", ["circles.worker.tap", "circles.worker.service", "circles.worker.engines",
                                    "circles.worker.tiny_engine"])
def test_the_worker_loads_nothing_of_the_server(module):
    names = imported(f"import {module}")
    assert module in names
    assert loaded(names, SERVER) == []


@pytest.mark.parametrize("module", ["circles.backend.tasks", "circles.backend.redis", "circles.backend.redis_url",
                                    "circles.backend.sentinel", "circles.backend.reachability", "circles.backend.embedded",
                                    "circles.backend.dispatch", "circles.backend.health", "circles.backend.replies",
                                    "circles.backend.replica_acks", "circles.backend.housekeeping", "circles.backend.scripts",
                                    "circles.backend.members", "circles.backend.group_wait",
                                    "circles.backend.commands", "circles.backend.redis_options",
                                    "circles.backend.init_scripts"])
def test_the_backend_loads_neither_server_nor_worker(module):
    names = imported(f"import {module}")
    assert loaded(names, SERVER + ("circles.worker", "circles.client")) == []


@pytest.mark.parametrize("module", ["circles.common.children", "circles.common.once"])
def test_the_shared_pieces_load_no_side_of_the_seams(module):
    # What the server, the worker, the client and the try-out all use.
    names = imported(f"import {module}")
    assert loaded(names, SERVER + ("circles.worker", "circles.client", "circles.backend", "circles.tryout")) == []


#: What an engine child has no use for: it reads frames on a pipe and calls the engine.
NOT_FOR_AN_ENGINE_CHILD = ("twisted", "txredisapi", "autobahn", "OpenSSL", "cryptography", "circles.backend",
                           "circles.server", "circles.worker.engines", "circles.worker.isolation",
                           "circles.worker.service")


def test_an_engine_child_loads_neither_twisted_nor_redis(tmp_path):
    # A child replaced (after tasks_per_child scripts, a deadline, a memory error) starts in some
    # 70 ms of CPU with the tiny engine, not the 250 ms that importing Twisted and txredisapi took
    # (docs/benchmarks.md): a client whose scripts each cost a child must not cost that much more.
    statement = ("import json, os, sys\n"
                 "from circles.worker.engine_child import Reader, encode_frame\n"
                 "import subprocess\n"
                 "child = subprocess.Popen([sys.executable, '-c', 'import atexit, json, sys; "
                 "atexit.register(lambda: sys.stderr.write(json.dumps(sorted(sys.modules)))); "
                 "from circles.worker.engine_child import main; main()'], stdin=subprocess.PIPE, "
                 "stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=sys.argv[1])\n"
                 "os.write(child.stdin.fileno(), encode_frame({'kind': 'init', 'spec': 'circles.worker.tiny_engine:run', "
                 "'path': sys.path, 'max_memory': 0}))\n"
                 "os.write(child.stdin.fileno(), encode_frame({'kind': 'task', 'context': {'task_id': 't', 'circle': 'c', "
                 "'caller': '', 'source': 'ws'}}, b'40 + 2'))\n"
                 "reader = Reader(child.stdout.fileno())\n"
                 "answers = [reader.frame(), reader.frame()]\n"
                 "child.stdin.close()\n"
                 "modules = child.stderr.read().decode()\n"
                 "child.wait()\n"
                 "print(json.dumps([[h for h, _ in answers], answers[1][1].decode(), json.loads(modules)]))")
    headers, output, names = printed(statement, str(tmp_path))
    assert [h["kind"] for h in headers] == ["ready", "done"] and output == "42"  # the engine did run
    assert "circles.worker.tiny_engine.evaluator" in names
    assert loaded(set(names), NOT_FOR_AN_ENGINE_CHILD) == []


def test_the_circles_command_loads_nothing_of_the_server_nor_the_worker():
    # What `circles keygen` runs before it parses its arguments.
    names = imported("import circles.client.cli")
    assert "circles.client.signing" in names
    assert loaded(names, SERVER[:-3] + ("klein", "prometheus_client", "circles.worker", "circles.backend")) == []


def ran(argv: list, modules_file) -> set:
    """The modules loaded in a fresh interpreter once ``circles ARGV`` ran to its end (its exit too)."""
    statement = ("import atexit, json, sys\n"
                 f"atexit.register(lambda: open({str(modules_file)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
                 f"sys.argv = ['circles', *{argv!r}]\n"
                 "from circles.client.cli import main\n"
                 "main()")
    result = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return set(json.loads(modules_file.read_text()))


#: What the commands that stay on this machine have no use for: the reactor, the WebSocket client,
#: Redis, TLS, keccak (only signing a nonce needs it), and the server's and worker's sides.
NOT_FOR_LOCAL_COMMANDS = ("twisted", "autobahn", "txredisapi", "OpenSSL", "cryptography", "Crypto", "klein",
                          "prometheus_client", "circles.client.connection", "circles.client.diagnostics",
                          "circles.common.tls_client", "circles.common.signatures", "circles.backend",
                          "circles.server", "circles.worker", "circles.service")


@pytest.mark.parametrize("argv", [["--version"], ["keygen", "--out", "-"], ["keygen", "--out", "KEY_FILE"],
                                  ["pubkey"]], ids=["version", "keygen-stdout", "keygen-file", "pubkey"])
def test_the_local_commands_load_no_reactor_websocket_nor_redis(argv, tmp_path):
    # `circles --version` and `circles keygen` start in tens of milliseconds: the libraries they load
    # are argparse's and coincurve's, nothing of Twisted (docs/benchmarks.md, "Start-up").
    key_file = tmp_path / "key"
    if argv == ["pubkey"]:
        key_file.write_text("11" * 32 + "\n")
        key_file.chmod(0o600)
        argv = ["pubkey", "--key-file", str(key_file)]
    argv = [str(key_file) if a == "KEY_FILE" else a for a in argv]
    names = ran(argv, tmp_path / "modules.json")
    assert "circles.client.cli" in names
    if argv[0] != "--version":
        assert "coincurve" in names  # the key was made or read: the command did run
    assert loaded(names, NOT_FOR_LOCAL_COMMANDS) == []
    if argv[-1] == str(key_file):
        assert len(key_file.read_text().strip()) == 64


#: secp256k1's generator point, compressed: a public key, so a circle id.
GENERATOR = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"


def test_a_remote_command_still_loads_what_it_needs():
    # The other side of the test above: the imports moved into the commands are still made there
    # (a connection refused at once, exit 3, after Twisted and Autobahn were loaded).
    statement = ("import json, sys\n"
                 f"GENERATOR = {GENERATOR!r}\n"
                 "sys.argv = ['circles', 'whoami', 'ws://127.0.0.1:1/' + GENERATOR, '--connect-timeout', '5']\n"
                 "from circles.client.cli import main\n"
                 "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
                 "print(json.dumps([code, sorted(sys.modules)]))")
    code, names = printed(statement)
    assert code == 3
    assert {"twisted.internet.reactor", "autobahn.twisted.websocket", "circles.client.connection"} <= set(names)


def test_importing_circles_loads_only_its_front_door():
    names = imported("import circles")
    assert loaded(names, ("circles",)) == ["circles", "circles.common", "circles.common.lazy"]
    # and the names it promises are there on first use
    names = imported("from circles import CirclesService, Config")
    assert {"circles.service", "circles.server.config"} <= names


def test_the_client_package_exports_load_on_first_use():
    assert "circles.client.connection" not in imported("import circles.client")
    from circles.client import RPCError, connect
    from circles.client.connection import RPCError as DefinedRPCError
    from circles.client.connection import connect as defined_connect
    assert (RPCError, connect) == (DefinedRPCError, defined_connect)
    with pytest.raises(AttributeError):
        import circles.client
        circles.client.no_such_name


#: What the server needs only once it serves, not to listen: the /auth and /webhooks routes with
#: Klein and Werkzeug and the providers' parsers (built at their first request), pycryptodome's
#: keccak (at the first Ethereum signature).
NOT_BEFORE_LISTENING = ("klein", "werkzeug", "Crypto", "circles.webhooks", "circles.server.http.nonce_route",
                        "circles.server.providers.events", "circles.server.providers.signatures")


def test_the_server_listens_before_it_loads_what_only_serving_needs(redis_server):
    # What `twistd -n circles --redis-url URL` does up to its port listening: the plugin's options, its
    # makeService, the service started (docs/benchmarks.md, "Start-up"). A bound port takes
    # connections before the reactor runs, so the reactor is not run here.
    statement = ("import json, sys\n"
                 "from twisted.plugins.circles_plugin import circles as plugin\n"
                 "options = plugin.options()\n"
                 f"options.parseOptions(['--redis-url', {redis_server.url!r}, '--port', '0', '--interface', '127.0.0.1'])\n"
                 "root = plugin.makeService(options)\n"
                 "root.privilegedStartService()\n"
                 "root.startService()\n"
                 "[service] = root\n"
                 "print(json.dumps([service.listeners[0].port.getHost().port, sorted(sys.modules)]))")
    port, names = printed(statement)
    assert port > 0
    assert {"circles.service", "autobahn.twisted.resource", "txredisapi", "prometheus_client"} <= set(names)
    assert loaded(set(names), NOT_BEFORE_LISTENING) == []


@pytest.mark.parametrize("plugin, argv", [("circles", ["--port", "0", "--interface", "127.0.0.1"]),
                                          ("circles_worker", ["-k", GENERATOR, "--engine", "circles.worker.tiny_engine:run"])],
                         ids=["server", "worker"])
def test_twistd_freezes_start_up_and_serves_events_directly(redis_server, plugin, argv):
    # The plugin's makeService, then the reactor running: start-up's objects are frozen (gc.freeze),
    # so that no full collection walks them again (docs/benchmarks.md).
    statement = ("import gc, json\n"
                 f"from twisted.plugins.circles_plugin import {plugin} as plugin\n"
                 "from twisted.internet import reactor\n"
                 "options = plugin.options()\n"
                 f"options.parseOptions(['--redis-url', {redis_server.url!r}, *{argv!r}])\n"
                 "root = plugin.makeService(options)\n"
                 "before = gc.get_freeze_count()\n"
                 "reactor.callLater(0.1, reactor.stop)\n"
                 "reactor.run()\n"
                 "loop = getattr(reactor.doIteration, '__self__', None)\n"
                 "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold(), type(loop).__name__]))")
    before, after, thresholds, loop = printed(statement)
    assert before == 0 and after > 10_000
    # Each event served by a direct call (circles.common.event_loop), in both processes.
    assert loop == "DirectPoll"
    # The server's youngest generation waits for more objects (the worker gained nothing by it).
    assert thresholds == ([5000, 10, 10] if plugin == "circles" else [700, 10, 10])
