"""The predictor: loads model versions from the registry and serves predictions over gRPC."""
