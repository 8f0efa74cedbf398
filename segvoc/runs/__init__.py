"""A run's life on disk: its directory, resume, sweeps and their summary, seed groups, the Optuna study and the
model card."""
