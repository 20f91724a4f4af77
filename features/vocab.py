"""ID vocabularies: raw IDs -> dense indices that never move.

Known IDs keep their index across rebuilds and new IDs are appended, so the rows of a
warm-started embedding table still belong to the same users and items.
"""

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.core.artifacts import write_parquet
from recsys.core.errors import DataValidationError
from recsys.core.schema import INDEX_DTYPE

ID = "id"
INDEX = "index"


def _integer_like(ids: pl.Series) -> bool:
    """True when every ID is text of an integer that round-trips ("42", not "042")."""
    if ids.dtype.is_integer():
        return True
    as_int = ids.str.to_integer(strict=False)
    return as_int.null_count() == ids.null_count() and bool((as_int.cast(pl.String) == ids).all())


def reconcile_ids(name: str, known: pl.DataType | None, new: pl.Series) -> pl.Series:
    """Bring newly read IDs to one type with the IDs already known.

    Integer IDs stay integers (also when they came from a CSV as text); if either side
    holds non-integer text, every ID is text.
    """
    new = new.cast(pl.Int64) if new.dtype.is_integer() else new.cast(pl.String)
    if known is None:
        return new.cast(pl.Int64) if _integer_like(new) and len(new) else new
    if known == pl.Int64:
        if not _integer_like(new):
            bad = new.filter(new.str.to_integer(strict=False).is_null()).head(3).to_list()
            raise DataValidationError(
                "vocabulary",
                name,
                f"the existing vocabulary holds integer IDs, the new data has text IDs {bad}",
            )
        return new.cast(pl.Int64)
    return new.cast(pl.String)


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of raw IDs; an ID's position is its dense index."""

    name: str
    ids: pl.Series

    @classmethod
    def empty(cls, name: str, text: bool = False) -> "Vocabulary":
        """An empty vocabulary; `text` forces text IDs, otherwise the first IDs decide."""
        return cls(name, pl.Series(ID, [], dtype=pl.String if text else pl.Int64))

    @classmethod
    def build(cls, name: str, ids: pl.Series, text: bool = False) -> "Vocabulary":
        return cls.empty(name, text).extend(ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dtype(self) -> pl.DataType:
        return self.ids.dtype

    def extend(self, ids: pl.Series) -> "Vocabulary":
        """Append the IDs not yet known, sorted so that the result is deterministic."""
        known_dtype = self.dtype if len(self) or self.dtype == pl.String else None
        ids = reconcile_ids(self.name, known_dtype, ids.drop_nulls())
        existing = self.ids.cast(ids.dtype)
        distinct = ids.unique()
        new = distinct.filter(~distinct.is_in(existing.implode())).sort()
        return Vocabulary(self.name, pl.concat([existing, new]).rename(ID))

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {ID: self.ids, INDEX: pl.int_range(len(self), dtype=INDEX_DTYPE, eager=True)}
        )

    def join_key(self, raw_dtype: pl.DataType) -> pl.DataFrame:
        """The vocabulary as a join table whose `id` column has the dtype of the raw data."""
        return self.to_frame().with_columns(pl.col(ID).cast(raw_dtype))

    def save(self, path: Path) -> None:
        write_parquet(self.to_frame(), path)

    @classmethod
    def load(cls, name: str, path: Path) -> "Vocabulary":
        frame = pl.read_parquet(path)
        if frame.columns != [ID, INDEX] or not frame[INDEX].equals(
            pl.int_range(frame.height, dtype=INDEX_DTYPE, eager=True).rename(INDEX)
        ):
            raise DataValidationError(path, None, "not a vocabulary (expected id, index 0..n-1)")
        return cls(name, frame[ID].cast(pl.Int64) if frame[ID].dtype.is_integer() else frame[ID])
