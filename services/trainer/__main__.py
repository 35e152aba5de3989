"""`python -m services.trainer` runs the trainer service."""

from services.trainer.main import main

main()
