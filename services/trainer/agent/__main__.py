"""`python -m services.trainer.agent` runs a worker agent."""

from services.trainer.agent.main import main

main()
