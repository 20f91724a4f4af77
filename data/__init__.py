"""Data sets: MovieLens-100K fetched through PyPI, and a synthetic generator with planted
structure. Loaders write Parquet into a cache directory; nothing large is committed."""
