# circles inside a Twisted application of your own: a complete .tac file.
#
#     twistd -ny examples/embed.tac
#
# serves circles on 127.0.0.1:8080 (ws://localhost:8080/<circle>) with authentication, beside
# whatever else the application runs. Scripts go to the circles' workers through Redis:
# $CIRCLES_REDIS_URL (the one `twistd circles-worker` reads too), else a private redis-server
# that the service starts and stops, on a socket in ./circles-state (where a worker looks when
# given no Redis). So a worker, started in the same directory, in another terminal, with no pid
# file (twistd keeps one, ./twistd.pid, per directory: a second twistd there would not start):
#
#     twistd -n --pidfile= circles-worker -k <circle> --engine circles.worker.tiny_engine:run
#
# Also read here: $CIRCLES_PORT (0: any free port), $CIRCLES_CIRCLES (circle keys,
# comma-separated; none: any circle), $CIRCLES_TLS_CERT and $CIRCLES_TLS_KEY (PEM files: wss://
# instead of ws://).
import os

from twisted.application.service import Application
from twisted.internet import reactor
from twisted.logger import Logger

from circles import CirclesService, Config
from circles.server import tls

log = Logger(namespace="embed")
cert, key = os.environ.get("CIRCLES_TLS_CERT"), os.environ.get("CIRCLES_TLS_KEY")

config = Config(
    circles=[pk for pk in os.environ.get("CIRCLES_CIRCLES", "").split(",") if pk],
    auth_required=True,
    port=int(os.environ.get("CIRCLES_PORT", "8080")),
    interface="127.0.0.1",  # "": every interface
    tls=tls.load(cert, key) if cert else None,
    redis_url=os.environ.get("CIRCLES_REDIS_URL"),  # None: a private redis-server, in state_dir
    state_dir="circles-state",  # the twistd plugins' default --state-dir: the worker finds it there
)

application = Application("my-application")  # what twistd runs; add your own services to it too
service = CirclesService(config, reactor=reactor)
service.setServiceParent(application)


def listening(ports):
    for port in ports:
        log.info("circles is listening on port {port}", port=port.getHost().port)


service.when_listening().addCallback(listening)
