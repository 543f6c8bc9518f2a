"""``python -m circles.tryout``: what ``./scripts/try`` runs after its set-up."""

from circles.tryout import main

main()
