"""The layout as written down, and the rules of the code, read from the source.

That each process loads only its own side of the seams, measured in a fresh interpreter, is
tests/integration/test_layout.py.
"""

import ast
from pathlib import Path

# --- the layout as written down, and the rules of the code ---------------------------------

ROOT = Path(__file__).resolve().parents[2]
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


#: Where one Deferred may carry several callbacks in one function: the hot paths, run for every
#: handshake, message, play or reply, where a coroutine each time would cost (README, "How the code
#: is written"); each says so in a comment. Everywhere else a sequence is an ``async def``.
CALLBACK_CHAINS = {
    ("circles/protocol.py", "onConnect"),
    ("circles/protocol.py", "onMessage"),
    ("circles/server/session/methods.py", "play"),
    ("circles/backend/commands.py", "command"),
    ("circles/backend/replies.py", "route"),
    ("circles/worker/service.py", "_run"),
}
_ADD = {"addCallback", "addCallbacks", "addErrback", "addBoth"}
_SEES_RESULTS = {"addCallback", "addCallbacks", "addBoth"}  # an errback alone only consumes failures


def _own_nodes(function: ast.AST):
    """The nodes of ``function``'s own body: not those of the functions, lambdas and classes in it."""
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield node
            stack.extend(ast.iter_child_nodes(node))


def _adding(node: ast.AST, names=_ADD) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names


def _callback_chains(text: str) -> "list[tuple[str, int]]":
    """(function, line) of each function that adds more than one callback to the same Deferred
    (``d.addCallback(f).addErrback(g)``, or ``d.addCallback(f)`` then ``d.addErrback(g)``)."""
    chains = []
    for function in ast.walk(ast.parse(text)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        added: dict[str, int] = {}
        for node in _own_nodes(function):
            if _adding(node):
                deferred = node.func.value
                while _adding(deferred):  # a chained call adds to the Deferred it was called on
                    deferred = deferred.func.value
                added[ast.dump(deferred)] = added.get(ast.dump(deferred), 0) + 1
        if any(n > 1 for n in added.values()):
            chains.append((function.name, function.lineno))
    return chains


def _combinators_by_hand(text: str) -> "list[int]":
    """Lines where a loop (``for``, a comprehension) adds callbacks that see results to each of
    several Deferreds: the first of N, or all of N, by hand."""
    loops = (ast.For, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    return sorted({node.lineno for loop in ast.walk(ast.parse(text)) if isinstance(loop, loops)
                   for node in ast.walk(loop) if _adding(node, _SEES_RESULTS)})


def test_sequences_are_coroutines_not_callback_chains():
    # README, "How the code is written": async def + ensureDeferred, chains only on the hot paths.
    chains = [f"{module}:{line} {name}" for module in _modules()
              for name, line in _callback_chains((ROOT / module).read_text(encoding="utf-8"))
              if (module, name) not in CALLBACK_CHAINS]
    assert chains == []


def test_every_allowed_callback_chain_is_still_one():
    # An entry whose function no longer chains is taken off the list, not left to allow a new one.
    chaining = {(module, name) for module in _modules()
                for name, _ in _callback_chains((ROOT / module).read_text(encoding="utf-8"))}
    assert CALLBACK_CHAINS - chaining == set()


def test_no_deferred_combinators_by_hand():
    # Twisted's own: DeferredList, gatherResults, race.
    by_hand = [f"{module}:{line}" for module in _modules()
               for line in _combinators_by_hand((ROOT / module).read_text(encoding="utf-8"))]
    assert by_hand == []


def test_the_async_rules_find_what_they_forbid():
    assert _callback_chains("def f(d):\n    return d.addCallback(g).addErrback(h)\n") == [("f", 1)]
    assert _callback_chains("def f(self):\n    d = go()\n    d.addCallback(g)\n    d.addBoth(done)\n") == [("f", 1)]
    # one callback on each of two Deferreds, or one in a nested function, is no chain
    assert _callback_chains("def f(d, e):\n    d.addCallback(g)\n    e.addErrback(h)\n") == []
    assert _callback_chains("def f(d):\n    def g(r):\n        return r.addBoth(h)\n    d.addCallback(g)\n") == []
    first_of_n = ("async def first(answers):\n    found = Deferred()\n    for answer in answers:\n"
                  "        answer.addCallback(found.callback).addErrback(lambda _: None)\n    return await found\n")
    assert _combinators_by_hand(first_of_n) == [4]
    assert _combinators_by_hand("def f(ds):\n    return [d.addBoth(seen) for d in ds]\n") == [2]
    # consuming the failures of several Deferreds is no combinator
    assert _combinators_by_hand("def f(ds):\n    for d in ds:\n        d.addErrback(lambda _: None)\n") == []


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
     "circles.server.tls", "circles.server.websocket", "circles.server.jobs"),
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
