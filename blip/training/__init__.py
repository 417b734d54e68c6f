"""The one training loop every training stage shares: optimisation, precision, DDP, checkpoints, resume."""
