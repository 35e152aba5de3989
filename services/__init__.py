"""modelgrid services."""
