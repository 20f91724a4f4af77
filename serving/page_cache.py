"""Reading a mapped file into the page cache before its first query."""

from pathlib import Path

import psutil


def warm_page_cache(path: Path, chunk_bytes: int = 1 << 24) -> None:
    """Read the whole file into the page cache before mapping it, when it fits in half the
    available memory: otherwise the first queries after a start or a version switch fault
    their pages in from disk one by one, which on a network disk costs each of them far
    more than the search itself. Plain reads, not Annoy's `prefault` (MAP_POPULATE): Annoy
    holds the GIL while it maps, so prefaulting a 1M-item index stalled every request of
    the worker for 0.3-1.3 s; a read releases the GIL. A file larger than that is left to
    page in on demand, as the indexes' on-disk designs intend."""
    try:
        if path.stat().st_size >= psutil.virtual_memory().available / 2:
            return
        buffer = bytearray(chunk_bytes)
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    except OSError:
        return
