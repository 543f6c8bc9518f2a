"""circles: the WebSocket gateway of the Circles ecosystem.

Three processes share this package, each in its own part of it:

- the server (``twistd circles``): :mod:`circles.service` and the modules beside it (JSON-RPC,
  auth, limits, webhooks), its HTTP edge in :mod:`circles.server.http`;
- the worker (``twistd circles-worker``): :mod:`circles.worker`;
- the client (``circles`` command, :mod:`circles.client`);

and :mod:`circles.backend` is the Redis seam between server and worker. :mod:`circles.tryout`
runs all three on one machine. Attributes load on first use, so importing ``circles`` costs
nothing: ``from circles import CirclesService, Config``.
"""

from circles.common.lazy import exports

__all__ = ["CirclesService", "Config"]
__version__ = "0.1.0"  # the one place; pyproject.toml reads it, --version prints it
__getattr__, __dir__ = exports(__name__, {"CirclesService": "circles.service", "Config": "circles.server.config"})
