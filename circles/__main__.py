"""``python -m circles``: the ``circles`` command (:mod:`circles.client.cli`), for when it is not on PATH."""

from circles.client.cli import main

main()
