"""The worker protocols a server can dispatch through and a worker can serve
(``--worker-protocol``): ours (``circles``, :mod:`circles.backend.tasks`) and the ecosystem
dispatchers' job schemas (:mod:`circles.backend.job_schema`), by name.

Adding a schema (rhailib's, once its field names are known) is one module like
:mod:`circles.backend.hero` and one line here.
"""

from __future__ import annotations

from circles.backend.hero import HERO
from circles.backend.job_schema import JobSchema

#: Ours: the default.
CIRCLES = "circles"
#: The job schemas, by ``--worker-protocol`` name.
SCHEMAS: dict[str, JobSchema] = {HERO.name: HERO}
NAMES = (CIRCLES, *SCHEMAS)


def schema(name: str) -> JobSchema | None:
    """The job schema of protocol ``name``; None for ours. KeyError for an unknown name."""
    if name == CIRCLES:
        return None
    return SCHEMAS[name]


def check(name: str) -> str:
    """``name`` if it is a protocol's (``--worker-protocol``), else ValueError saying which are."""
    if name not in NAMES:
        raise ValueError(f"{name!r} is not one of {', '.join(NAMES)}")
    return name
