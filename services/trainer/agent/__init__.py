"""Worker agent: one per host; reserves ports and runs, watches and stops the trainer's worker processes."""
