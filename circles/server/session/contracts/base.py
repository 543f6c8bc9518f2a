"""What an API contract is (:class:`Contract`), and the set of them a server speaks (:class:`Registry`).

A contract is everything a connection's choice of API decides: which methods exist and their
params (its method table), how the results of ``fetch_nonce``, ``authenticate`` and ``play``
look, which codes and messages its errors carry, and its OpenRPC document. A session holds its
contract (chosen once, by WebSocket subprotocol, else the server's ``--api``), and the methods,
written once (:mod:`circles.server.session.methods`), ask it for those.

Every document is ``openrpc.json`` (the one source; the package carries it: a symlink in the tree,
a copy in built wheels), changed where the contract differs, so the documents cannot drift apart
on what they share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from importlib import resources
from typing import Any

import attrs

from circles.backend.scripts import ScriptFailed
from circles.common.jsonrpc import Methods, RPCError
from circles.server.access.nonces import Nonce


@attrs.frozen(eq=False)
class Contract:
    """One JSON-RPC contract, as the session uses it and as its OpenRPC document describes it.

    Equal only to itself (and hashed so): a session's dispatcher and document are found by it.
    """

    #: What ``--api`` (``Config(api=...)``) takes, and the document's ``info.x-api``.
    name: str
    #: The WebSocket subprotocol a client offers to get it on any server (the document's ``info.x-subprotocol``).
    subprotocol: str
    #: Which methods exist, and their params (what the JSON-RPC dispatcher of its sessions calls).
    methods: Methods
    # --- result shaping
    #: ``fetch_nonce``'s result, from the nonce issued (circles.server.access.nonces.Nonce).
    nonce_result: Callable[[Nonce], Any]
    #: ``authenticate``'s result, from the key that signed.
    authenticated: Callable[[str], Any]
    #: ``play``'s result, from the script's output; None: the output itself (no callback added).
    play_result: Callable[[str], Any] | None
    # --- error mapping
    #: The error of a ``play`` before authenticating, on a server with ``--auth``.
    auth_required: Callable[[], RPCError]
    #: The error of an ``authenticate`` that failed, from why (a person reads it).
    auth_failed: Callable[[str], RPCError]
    #: The error of a ``play`` whose script failed (its ``detail``, and ``output`` printed before).
    script_failed: Callable[[ScriptFailed], RPCError]
    # --- its document
    #: What it changes in ``openrpc.json``'s document (in place; ``info.x-api`` and
    #: ``info.x-subprotocol`` are set from the fields above first); None: ``openrpc.json`` as shipped.
    document_changes: Callable[[dict], None] | None = None

    def document_text(self) -> str:
        """Its OpenRPC document, as ``GET /openrpc.json`` serves it (made once)."""
        return _document_text(self)

    def document(self) -> dict:
        """A fresh copy of its OpenRPC document (callers may change it: it is theirs)."""
        return json.loads(_document_text(self))


def shipped_document_text() -> str:
    """``openrpc.json``, as the package carries it."""
    return resources.files("circles").joinpath("openrpc.json").read_text("utf-8")


@cache
def _document_text(contract: Contract) -> str:
    text = shipped_document_text()
    if contract.document_changes is None:
        return text
    document = json.loads(text)
    document["info"]["x-api"] = contract.name
    document["info"]["x-subprotocol"] = contract.subprotocol
    contract.document_changes(document)
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def method(document: dict, name: str) -> dict:
    """The description of method ``name`` in an OpenRPC ``document`` (to change it)."""
    return next(m for m in document["methods"] if m["name"] == name)


class Registry:
    """The contracts a server speaks, by name (``--api``) and by subprotocol, in the order given."""

    def __init__(self, *contracts: Contract) -> None:
        self._contracts = contracts
        self._by_name = {contract.name: contract for contract in contracts}
        self._by_subprotocol = {contract.subprotocol: contract for contract in contracts}
        if len(self._by_name) != len(contracts) or len(self._by_subprotocol) != len(contracts):
            raise ValueError("two contracts share a name or a subprotocol")

    def __iter__(self) -> Iterator[Contract]:
        return iter(self._contracts)

    def __len__(self) -> int:
        return len(self._contracts)

    def __getitem__(self, name: str) -> Contract:
        """The contract ``--api name`` names; KeyError for one not here."""
        return self._by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def method_names(self) -> frozenset:
        """Every method name some contract here has."""
        return frozenset(name for contract in self._contracts for name in contract.methods)

    def negotiate(self, offered: Sequence[str], default: Contract) -> tuple[Contract, str | None]:
        """(the contract a connection gets, the subprotocol to answer with) for the subprotocols a
        client offered: the first one here, in the client's order of preference; else ``default``
        (the server's ``--api``) and no subprotocol (a client that offers none, or only unknown ones)."""
        for name in offered:
            contract = self._by_subprotocol.get(name)
            if contract is not None:
                return contract, name
        return default, None
