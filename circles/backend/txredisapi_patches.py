"""What circles changes in txredisapi, and where it leans on txredisapi's internals.

txredisapi names two things at call time, which are replaced here when this module is imported
(:mod:`circles.backend.redis` imports it before any connection is made):

- ``txredisapi.ClientService``: each pooled connection's reconnecting service. Ours is Twisted's
  own with its reconnection messages at debug (through ``ClientService._log``, a private
  attribute of Twisted's: see ``tests/test_dependencies.py``).
- ``txredisapi.log``: the module's legacy ``log.msg`` lines, at debug in our own namespace.
"""

from __future__ import annotations

import txredisapi
from twisted.application.internet import ClientService
from twisted.logger import LogLevel

from circles.common.logs import Logger


class _QuietLogger(Logger):
    """Twisted's reconnection messages ("Scheduling retry 5 to connect ... in 2.1 seconds"),
    one per attempt per connection, at debug instead of info."""

    def emit(self, level: LogLevel, format=None, **kwargs) -> None:
        super().emit(LogLevel.debug if level == LogLevel.info else level, format, **kwargs)


class _QuietClientService(ClientService):
    _log = _QuietLogger()


class _TxredisapiLog:
    """What txredisapi finds as ``log``: its few messages ("Discarding dead connection.", "Redis
    error: could not auth: ...", which :class:`~circles.backend.reachability.Reachability` says better) at debug, not at info
    as Twisted's legacy ``log.msg`` writes them."""

    def msg(self, *message, **kwargs) -> None:
        _txredisapi_log.debug("{message}", message=" ".join(str(part) for part in message))


_txredisapi_log = Logger(namespace="txredisapi")


# txredisapi names these at call time: each pooled connection's ClientService (ours is the same
# but for its log level), and its log.
txredisapi.ClientService = _QuietClientService
txredisapi.log = _TxredisapiLog()
