"""`python -m services.cli` runs the `modelgrid` command-line client."""

from services.cli.main import main

main()
