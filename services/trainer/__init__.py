"""Trainer service: accepts training jobs, schedules worker groups, restarts them from checkpoints."""
