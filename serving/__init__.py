"""Serving: index, cache and HTTP app (reads only built versions, manifest first)."""
