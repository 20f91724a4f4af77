"""Raw ID <-> dense index for one vocabulary, held in NumPy arrays instead of Python
dicts and lists. Why: a 1M-item version's dict and list were millions of Python objects,
built while the worker answered (each piece held the GIL for 25-30 ms) and freed on the
event loop at the next switch (~70 ms), a stall every request of the worker waited for.
Arrays are built in vectorised calls that release the GIL and freed at once.

Integer IDs: binary search in the sorted IDs. Text IDs: binary search over the UTF-8 bytes
in byte order, read from the Arrow buffers of the vocabulary column without copying."""

import bisect

import numpy as np
import polars as pl

from recsys.core.ids import canonical_integer


class IdLookup:
    def __init__(self, ids: pl.Series) -> None:
        self.integer = ids.dtype == pl.Int64
        if self.integer:
            self._values = ids.to_numpy()
            self._order = np.argsort(self._values, kind="stable")
            self._sorted = self._values[self._order]
            return
        text = ids.cast(pl.String).rechunk()
        arrow = text.to_arrow()
        _, offsets, data = arrow.buffers()
        start = arrow.offset
        self._offsets = np.frombuffer(offsets, dtype=np.int64)[start : start + len(text) + 1]
        self._data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0)
        self._order = text.cast(pl.Binary).arg_sort().to_numpy()
        self._keep = arrow  # the buffers the views above read

    def __len__(self) -> int:
        return len(self._order)

    def _bytes(self, index: int) -> bytes:
        return self._data[self._offsets[index] : self._offsets[index + 1]].tobytes()

    def typed(self, raw: object) -> int | str | None:
        """A request's ID (always text in a URL) in the vocabulary's own type; None for
        text that is no canonical integer in a vocabulary of integers (recsys.core.ids)."""
        if not self.integer:
            return str(raw)
        return canonical_integer(raw)  # "1_0" names no user, never user 10

    def find(self, raw: object) -> int | None:
        """The dense index of a request's ID, None if the vocabulary lacks it."""
        key = self.typed(raw)
        return None if key is None else self.index(key)

    def index(self, raw: int | str) -> int | None:
        """The dense index of `raw` (already in the vocabulary's type), None if unknown."""
        if self.integer:
            if not isinstance(raw, int) or not -(2**63) <= raw < 2**63:
                return None
            pos = int(self._sorted.searchsorted(raw))
            if pos < len(self._sorted) and self._sorted[pos] == raw:
                return int(self._order[pos])
            return None
        target = str(raw).encode()
        pos = bisect.bisect_left(
            range(len(self._order)), target, key=lambda p: self._bytes(int(self._order[p]))
        )
        if pos < len(self._order) and self._bytes(int(self._order[pos])) == target:
            return int(self._order[pos])
        return None

    def raw(self, indices: np.ndarray) -> list[int | str]:
        """The raw IDs of dense indices, in order."""
        if self.integer:
            return list(self._values[indices].tolist())
        return [self._bytes(i).decode() for i in np.asarray(indices).tolist()]
