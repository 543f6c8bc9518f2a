"""The OpenRPC document describing the JSON-RPC API, as shipped in the package.

``openrpc.json`` at the repository root is the one source; the package carries it (a symlink
in the tree, a copy in built wheels) so ``rpc.discover`` can answer with it when installed.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def document_text() -> str:
    return resources.files(__package__).joinpath("openrpc.json").read_text("utf-8")


def document() -> dict:
    """A fresh copy of the document (callers may not mutate a shared one)."""
    return json.loads(document_text())
