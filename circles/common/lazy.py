"""Package attributes imported on first use (PEP 562), so a package's front door is cheap.

``circles keygen`` and ``circles-worker`` import ``circles``; with lazy attributes that loads
nothing of the server (Autobahn, Klein, prometheus) until someone asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """A package's ``__getattr__`` and ``__dir__`` for ``where``: public name -> module holding it."""

    def __getattr__(name: str) -> object:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list:
        return sorted(set(where) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
