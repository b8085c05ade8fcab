"""``python -m ledger`` runs the CLI."""

from ledger._cli import main

main()
