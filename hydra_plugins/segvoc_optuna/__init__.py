"""segvoc's Hydra sweeper on Optuna 4 (``hydra/sweeper=segvoc_optuna``)."""
