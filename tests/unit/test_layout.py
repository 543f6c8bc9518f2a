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


def test_no_module_imports_another_modules_private_names():
    crossings = []
    for module in _modules():
        tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("circles"):
                crossings += [f"{module}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__future__"]
    assert crossings == []
