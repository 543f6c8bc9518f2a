"""twistd plugins of the circles package (``twistd -n circles --help``)."""

from twisted.application.service import ServiceMaker


class _Plugin(ServiceMaker):
    """A plugin whose usage mistakes are one line, not twistd's page of usage text
    (:func:`circles.common.options.one_line_mistakes`)."""

    @property
    def options(self):
        from circles.common.options import one_line_mistakes
        return one_line_mistakes(super().options, self.tapname)


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
