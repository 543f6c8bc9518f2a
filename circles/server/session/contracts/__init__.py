"""The API contracts a server speaks, one module each, and their registry (:data:`CONTRACTS`).

A client picks one per connection by offering its WebSocket subprotocol (our client, CLI and
playground offer ours); one that offers none gets the server's ``--api``. README, "API", says
where they differ. A fourth contract is a module beside these (a
:class:`~circles.server.session.contracts.base.Contract`) and its entry below, with its name and
subprotocol in :mod:`circles.common.wire` (what clients share, and the names ``Config``, below the
session layer, checks ``--api`` against; a test holds them and this registry equal).
"""

from circles.server.session.contracts import circles_era, gateway, hero
from circles.server.session.contracts.base import Registry

#: Every contract, in the order ``--api`` lists them.
CONTRACTS = Registry(
    gateway.CONTRACT,
    circles_era.CONTRACT,
    hero.CONTRACT,
)
