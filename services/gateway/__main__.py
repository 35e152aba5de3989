"""`python -m services.gateway` runs a gateway instance."""

from services.gateway.main import main

main()
