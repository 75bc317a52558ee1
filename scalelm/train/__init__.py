"""The training loop and what it reports: schedule, metrics, logs."""
