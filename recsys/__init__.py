"""Shared core of the recommender: settings, schema, artifact store and the `recsys` CLI."""

__version__ = "0.22.0"
