"""The package layout holds: each process loads only its own side of the seams.

Measured in a fresh interpreter: the modules in ``sys.modules`` once the statement ran (what
``python -X importtime`` lists too, except that it does not see modules loaded through
``importlib``, as the package's lazy attributes are).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

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
                                    "circles.backend.commands"])
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
    from circles.client.connection import RPCError as DefinedRPCError, connect as defined_connect
    assert (RPCError, connect) == (DefinedRPCError, defined_connect)
    with pytest.raises(AttributeError):
        import circles.client
        circles.client.no_such_name


# --- the layout as written down, and the rules of the code ---------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "circles"


def _modules() -> list:
    return sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py"))


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    def named(module: str) -> bool:
        if module.startswith("circles/server/http/playground/"):
            return "`circles/server/http/playground/`" in layout  # a page with its files, named whole
        if module.endswith("/__init__.py") and module.count("/") > 1:
            return f"`{module}`" in layout or f"`{module[:-len('__init__.py')]}`" in layout  # its package
        return f"`{module}`" in layout

    assert [m for m in _modules() if not named(m)] == []


def test_no_inline_callbacks():
    # The rule of asynchronous code (README, "How the code is written"): async def + ensureDeferred.
    users = [m for m in _modules() if "inlineCallbacks" in (ROOT / m).read_text(encoding="utf-8")]
    assert users == []


def test_no_module_imports_another_modules_private_names():
    crossings = []
    for module in _modules():
        tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("circles"):
                crossings += [f"{module}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__future__"]
    assert crossings == []


# --- which way imports go -------------------------------------------------------------------

#: The package's rooms, lowest first. A module may import from its own room and from rooms
#: below it, never from a room above it nor from another room of its own layer: lower layers
#: never know what is built on them. ``circles`` itself (the front door: ``__version__`` and
#: names that load on first use) may be imported from anywhere.
LAYERS = (
    ("circles.common",),  # every process: JSON-RPC, keys, signatures, logs, children, options
    ("circles.backend", "circles.client"),  # the Redis seam; the client library
    ("circles.worker", "circles.server.providers", "circles.server.access", "circles.server.metrics",
     "circles.server.tls", "circles.server.websocket"),
    ("circles.server.config", "circles.server.processes"),
    ("circles.server.gateway",),
    ("circles.server.session",),
    ("circles.server.http",),
    ("circles.protocol", "circles.webhooks"),  # the server's two faces
    ("circles.service",),  # the composition root: builds the parts once and wires them
    ("circles.server_tap",),  # twistd's options, in to a service out
    ("circles.tryout",),  # all three processes on one machine
    ("circles.client.cli",),  # the `circles` command, `circles try` included
    ("circles.__main__",),  # python -m circles: the same command
)


def _room(module: str) -> "tuple[int, str]":
    """(layer, room) of a dotted module name: the longest room that holds it."""
    best = None
    for layer, rooms in enumerate(LAYERS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best[1])):
                best = (layer, room)
    assert best is not None, f"{module} is in no room of LAYERS: give it one"
    return best


def _dotted(path: str) -> str:
    name = path[:-len(".py")].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _imports(path: str, text: "str | None" = None) -> "list[tuple[str, int]]":
    """The circles modules ``path`` imports (at any depth of its code, lazy imports too), with
    their line numbers; ``from package import module`` counts as the module."""
    found = []
    text = (ROOT / path).read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("circles")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("circles"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / (candidate.replace(".", "/") + ".py")).exists() or \
                    (ROOT / candidate.replace(".", "/") / "__init__.py").exists()
                found.append((candidate if is_module else node.module, node.lineno))
    return found


def test_every_module_has_a_room():
    for module in _modules():
        name = _dotted(module)
        if name in ("circles", "circles.server"):
            continue  # the front door; a docstring naming the server's rooms
        _room(name)


def _upward(module: str, text: "str | None" = None) -> list:
    name = _dotted(module)
    if name in ("circles", "circles.server"):
        return []
    layer, room = _room(name)
    upward = []
    for imported, line in _imports(module, text):
        if imported in ("circles", "circles.server"):
            continue  # the front door (__version__, lazy names); a package of rooms
        their_layer, their_room = _room(imported)
        if their_room != room and their_layer >= layer:
            upward.append(f"{module}:{line} ({room}) imports {imported} ({their_room})")
    return upward


def test_imports_go_down_never_up():
    assert [line for module in _modules() for line in _upward(module)] == []


def test_the_layer_rule_finds_an_upward_import():
    # What the rule would say of a shared module reaching into the server, even lazily, and of
    # the backend reaching into the worker; a downward import passes.
    keys = "def f():\n    from circles.server.gateway import Gateway\n"
    assert _upward("circles/common/keys.py", keys) == [
        "circles/common/keys.py:2 (circles.common) imports circles.server.gateway (circles.server.gateway)"]
    assert _upward("circles/backend/tasks.py", "from circles.worker import engines\n") == [
        "circles/backend/tasks.py:1 (circles.backend) imports circles.worker.engines (circles.worker)"]
    assert _upward("circles/service.py", "from circles.common import keys\n") == []
