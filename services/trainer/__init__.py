"""Trainer service: accepts training jobs, schedules worker groups, restarts them from checkpoints."""

VERSION = "0.1.0"
"""Version of the trainer, its agents and workers (in Consul meta, traces and registered lineage)."""
