"""Our server for the benchmark, exactly as ``twistd -n circles ARGS`` builds it, with one knob.

    CIRCLES_ARGS="-p 9000" CIRCLES_BENCH_MAX_NONCES=1000000000 twistd -n --pidfile= -y bench/circles_bench.tac

The service comes from the plugin's own ``Options`` and ``makeService`` (same reactor, same
logging as ``twistd -n circles``); the only change is the cap on outstanding nonces per
connection (``Config.max_nonces_per_session``, 16, not a command-line option), which workload
(1) has to lift: a connection that calls ``fetch_nonce`` in a loop holds every nonce it got
for the nonce TTL (300 s), so with the cap in place all calls after the 16th are refused with
-32006 and the benchmark would time the error path. The peers are run with the same cap.
"""

import os

import attrs
from twisted.application.service import Application

from circles import server_tap

_options = server_tap.Options()
_options.parseOptions(os.environ.get("CIRCLES_ARGS", "").split())
_cap = os.environ.get("CIRCLES_BENCH_MAX_NONCES")
if _cap:
    _options.config = attrs.evolve(_options.config, max_nonces_per_session=int(_cap))

application = Application("circles")
server_tap.makeService(_options).setServiceParent(application)
