"""Training: two-tower model, losses, trainer and evaluation (reads only feature tables)."""
