"""The `modelgrid` command-line client: models, versions, aliases and artifacts of the registry from a shell."""
