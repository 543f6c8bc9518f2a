"""Jobs: scripts a caller creates now, starts later and reads back afterwards (the hero contract's
jobs methods, :mod:`circles.server.session.jobs`).

- :mod:`circles.server.jobs.model`: what a job is, and the rules, as pure functions over one
  caller's table of jobs (create, start, stop, delete, prerequisites, the running bound);
- :mod:`circles.server.jobs.store`: where tables live (:class:`~circles.server.jobs.store.IJobStore`),
  and the store in this process's memory;
- :mod:`circles.server.jobs.redis_store`: the store in Redis, where every server process sees them;
- :mod:`circles.server.jobs.runner`: :class:`~circles.server.jobs.runner.Jobs`, which applies the
  rules to a store and runs the jobs they start through the server's script runner.
"""
