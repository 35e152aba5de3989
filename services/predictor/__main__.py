"""`python -m services.predictor` runs a predictor replica."""

from services.predictor.main import main

main()
