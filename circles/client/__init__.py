"""The client side: :mod:`circles.client.connection` (the Python client),
:mod:`circles.client.reconnecting` (a client that keeps its connection up),
:mod:`circles.client.diagnostics` (why a connection did not open), key files and signing
(:mod:`circles.client.signing`), and the ``circles`` command (:mod:`circles.client.cli`).

``from circles.client import connect, RPCError`` loads the module holding the name on first use.
"""

from circles.common.lazy import exports

_CONNECTION = "circles.client.connection"
_RECONNECTING = "circles.client.reconnecting"
_DIAGNOSTICS = "circles.client.diagnostics"
__all__ = ["CertificateNotVerified", "CircleClient", "ConnectFailed", "ConnectionClosed", "NoServerReachable",
           "ReconnectingClient", "RPCError", "check_url", "connect"]
__getattr__, __dir__ = exports(__name__, {
    "CertificateNotVerified": _DIAGNOSTICS, "ConnectFailed": _DIAGNOSTICS,
    "CircleClient": _CONNECTION, "ConnectionClosed": _CONNECTION, "RPCError": _CONNECTION, "check_url": _CONNECTION,
    "connect": _CONNECTION,
    "NoServerReachable": _RECONNECTING, "ReconnectingClient": _RECONNECTING,
})
