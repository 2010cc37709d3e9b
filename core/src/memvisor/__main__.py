"""``python -m memvisor`` runs the ``memvisor`` command."""

from memvisor.cli import main

main()
