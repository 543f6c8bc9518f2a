"""The API contract: the OpenRPC document describing the JSON-RPC API, as shipped in the
package, and the application error codes it names.

``openrpc.json`` at the repository root is the one source; the package carries it (a symlink
in the tree, a copy in built wheels) so ``rpc.discover`` can answer with it when installed.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

# The application's error codes (openrpc.json's errors; the design's -32001..-32006, and -32007).
AUTH_REQUIRED = -32001
AUTH_FAILED = -32002
SCRIPT_TIMEOUT = -32003
BACKEND_UNAVAILABLE = -32004
SCRIPT_FAILED = -32005
TOO_MANY_REQUESTS = -32006
REPLY_TOO_LARGE = -32007



@lru_cache(maxsize=1)
def document_text() -> str:
    return resources.files(__package__).joinpath("openrpc.json").read_text("utf-8")


def document() -> dict:
    """A fresh copy of the document (callers may not mutate a shared one)."""
    return json.loads(document_text())
