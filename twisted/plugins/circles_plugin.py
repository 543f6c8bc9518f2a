"""twistd plugins of the circles package (``twistd -n circles --help``)."""

from twisted.application.service import ServiceMaker

circles = ServiceMaker(
    "circles",
    "circles.server_tap",
    "Circles WebSocket gateway: JSON-RPC 2.0 sessions with secp256k1 authentication",
    "circles",
)

circles_worker = ServiceMaker(
    "circles-worker",
    "circles.worker.tap",
    "Circles reference worker: runs the scripts queued in Redis for its circles",
    "circles-worker",
)
