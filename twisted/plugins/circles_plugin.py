"""twistd plugins of the circles package (``twistd -n circles --help``)."""

import gc

from twisted.application.service import ServiceMaker


def _freeze_start_up() -> None:
    """What start-up made (modules, options, the services) is left out of every garbage
    collection from now on: a full collection of the server under load walked some 69,000 such
    objects, half of the collector's time (docs/benchmarks.md). A process of its own (twistd)
    only: an application embedding the service decides this for its own heap."""
    gc.collect()
    gc.freeze()


class _Plugin(ServiceMaker):
    """A plugin whose usage mistakes are one line, not twistd's page of usage text
    (:func:`circles.common.options.one_line_mistakes`)."""

    @property
    def options(self):
        from circles.common.options import one_line_mistakes
        return one_line_mistakes(super().options, self.tapname)

    def makeService(self, options):
        from twisted.internet import reactor

        service = super().makeService(options)
        reactor.callWhenRunning(_freeze_start_up)
        return service


circles = _Plugin(
    "circles",
    "circles.server_tap",
    "Circles WebSocket gateway: JSON-RPC 2.0 sessions with secp256k1 authentication",
    "circles",
)

circles_worker = _Plugin(
    "circles-worker",
    "circles.worker.tap",
    "Circles reference worker: runs the scripts queued in Redis for its circles",
    "circles-worker",
)
