"""The Redis seam: what the server and the worker share, and nothing of either.

- :mod:`circles.backend.tasks`: the task protocol (keys, states, the Lua steps), the code form of
  ``docs/worker-protocol.md``;
- :mod:`circles.backend.redis_url`: Redis URLs (TCP, TLS, Unix sockets, Sentinels) and their endpoints;
- :mod:`circles.backend.redis`: reconnecting connections (:mod:`circles.backend.sentinel` for a
  replicated Redis, :mod:`circles.backend.reachability` for what the operator hears,
  :mod:`circles.backend.txredisapi_patches` for what is changed in txredisapi);
- :mod:`circles.backend.embedded`: the private ``redis-server`` a server starts when given no URL;
- :mod:`circles.backend.scripts`: the gateway's view of a script backend (``IScriptRunner``);
- :mod:`circles.backend.dispatch`: the server's side of the protocol (``RedisScriptRunner``), with the
  parts it composes (:mod:`~circles.backend.health`, :mod:`~circles.backend.replies`,
  :mod:`~circles.backend.replica_acks`, :mod:`~circles.backend.housekeeping`).

The worker's side is :mod:`circles.worker`. Nothing here imports the gateway, Autobahn or Klein.
"""
