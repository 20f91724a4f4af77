"""Jagged (CSR) arrays and vectorised gathers: the host-side shape of TorchRec's
KeyedJaggedTensor values/lengths, built without Python loops over rows."""

from dataclasses import dataclass

import numpy as np
import polars as pl


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    run_starts = np.cumsum(lengths) - lengths  # where each run begins in the output
    within = np.arange(total) - np.repeat(run_starts, lengths)
    return np.repeat(starts, lengths) + within


@dataclass(frozen=True)
class CsrBags:
    """Row r's bag is `values[offsets[r]:offsets[r+1]]`."""

    offsets: np.ndarray  # (R + 1,) int64
    values: np.ndarray  # (V,) int64

    @classmethod
    def from_lists(cls, column: pl.Series) -> "CsrBags":
        lengths = column.list.len().fill_null(0).to_numpy().astype(np.int64)
        values = column.explode().drop_nulls().to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(offsets, values)

    @classmethod
    def empty(cls, rows: int) -> "CsrBags":
        return cls(np.zeros(rows + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Jagged (values, lengths) of the given rows, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        return self.values[ranges(starts, lengths)], lengths
