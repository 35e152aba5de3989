"""`python -m services.registry` runs the registry."""

from services.registry.main import main

main()
