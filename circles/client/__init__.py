"""The client side: :mod:`circles.client.connection` (the Python client), key files and
signing (:mod:`circles.client.signing`), and the ``circles`` command (:mod:`circles.client.cli`).

``from circles.client import connect, RPCError`` loads the connection module on first use.
"""

from circles.common.lazy import exports

_CONNECTION = "circles.client.connection"
__all__ = ["CertificateNotVerified", "CircleClient", "ConnectFailed", "ConnectionClosed", "NoServerReachable",
           "ReconnectingClient", "RPCError", "check_url", "connect"]
__getattr__, __dir__ = exports(__name__, {name: _CONNECTION for name in __all__})
