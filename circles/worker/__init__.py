"""The worker process (``twistd circles-worker``): runs the scripts servers queue in Redis.

- :mod:`circles.worker.service`: the ``Worker`` service (the worker's side of
  :mod:`circles.backend.tasks`);
- :mod:`circles.worker.engines`: what runs one script (``--exec``, ``--engine``);
- :mod:`circles.worker.isolation`: an ``--engine`` callable run in child processes
  (:mod:`circles.worker.engine_child`), so no script can hold the worker;
- :mod:`circles.worker.tiny_engine`: the try-out's engine: a sandboxed subset of Rhai, run in-process;
- :mod:`circles.worker.tap`: the twistd options.

It imports nothing of the gateway, Autobahn, Klein or prometheus (a test holds it to that).
"""
