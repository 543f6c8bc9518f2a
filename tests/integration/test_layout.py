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


def test_the_circles_command_loads_nothing_of_the_server_nor_the_worker():
    # What `circles keygen` runs before it parses its arguments.
    names = imported("import circles.client.cli")
    assert "circles.client.signing" in names
    assert loaded(names, SERVER[:-3] + ("klein", "prometheus_client", "circles.worker", "circles.backend")) == []


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
