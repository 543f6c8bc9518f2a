"""twistd plugins of the circles package (``twistd -n circles --help``)."""

import gc

from twisted.application.service import ServiceMaker

#: The server's youngest generation is collected once this many more objects are alive than
#: before, not Python's 700: under load most of what a play makes is gone by then, and the server's
#: instructions a play fell by 2% over 15,000 plays (docs/benchmarks.md). The worker's did not
#: move: it keeps Python's.
SERVER_YOUNG_GENERATION = 5000


def _freeze_start_up(young_generation: int | None = None) -> None:
    """What start-up made (modules, options, the services) is left out of every garbage
    collection from now on: a full collection of the server under load walked some 69,000 such
    objects, half of the collector's time (docs/benchmarks.md). And the youngest generation's
    threshold, if given. A process of its own (twistd) only: an application embedding the
    service decides this for its own heap."""
    gc.collect()
    gc.freeze()
    if young_generation:
        gc.set_threshold(young_generation, *gc.get_threshold()[1:])


class _Plugin(ServiceMaker):
    """A plugin whose usage mistakes are one line, not twistd's page of usage text
    (:func:`circles.common.options.one_line_mistakes`)."""

    def __init__(self, *args, young_generation: int | None = None) -> None:
        super().__init__(*args)
        self.young_generation = young_generation

    @property
    def options(self):
        from circles.common.options import one_line_mistakes
        return one_line_mistakes(super().options, self.tapname)

    def makeService(self, options):
        from twisted.internet import reactor

        from circles.common.event_loop import serve_events_directly

        service = super().makeService(options)
        serve_events_directly(reactor)  # a process of its own: see circles.common.event_loop
        reactor.callWhenRunning(_freeze_start_up, self.young_generation)
        return service


circles = _Plugin(
    "circles",
    "circles.server_tap",
    "Circles WebSocket gateway: JSON-RPC 2.0 sessions with secp256k1 authentication",
    "circles",
    young_generation=SERVER_YOUNG_GENERATION,
)

circles_worker = _Plugin(
    "circles-worker",
    "circles.worker.tap",
    "Circles reference worker: runs the scripts queued in Redis for its circles",
    "circles-worker",
)
