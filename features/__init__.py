"""Data layer: interaction logs and side tables -> validated, indexed feature tables."""
