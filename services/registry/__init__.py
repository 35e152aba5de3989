"""The model registry service: models, versions, artifacts, aliases and their audit trail."""
