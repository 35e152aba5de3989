"""Typed clients of modelgrid services: what one service (or the CLI) uses to call another."""
