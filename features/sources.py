"""Find the input files behind a `--data PATH` and open each one lazily with Polars."""

import codecs
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features.remote_logs import LogFile, RemoteFile, is_remote_log, list_remote_log
from recsys.core import schema as s
from recsys.core.errors import DataValidationError, RecsysError

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")
TABLE_SUFFIXES = PARQUET_SUFFIXES + CSV_SUFFIXES


@dataclass(frozen=True)
class DataSource:
    """The files of one data set: interaction logs plus optional item and user tables, and
    the names its files give our columns (`{"user_id": "customer_id"}`; none: ours)."""

    interactions: tuple[LogFile, ...]
    items: Path | None = None
    users: Path | None = None
    columns: dict[str, str] = field(default_factory=dict)


MAPPABLE = (s.USER_ID, s.ITEM_ID, s.TIMESTAMP, s.WEIGHT, s.EVENT)


def parse_columns(text: str | dict[str, str]) -> dict[str, str]:
    """'user_id=customer_id,item_id=sku' (or the same as a table) -> {'user_id':
    'customer_id', 'item_id': 'sku'}: our column name = the name in the files."""
    if isinstance(text, str):
        parts = [part for part in text.split(",") if part.strip()]
        if not all("=" in part for part in parts):
            raise RecsysError(f"columns are OURS=THEIRS pairs separated by commas, got {text!r}")
        text = dict(part.split("=", 1) for part in parts)
    mapping = {str(k).strip(): str(v).strip() for k, v in text.items()}
    unknown = sorted(set(mapping) - set(MAPPABLE))
    if unknown:
        raise RecsysError(
            f"cannot map column(s) {', '.join(unknown)}; mappable: {', '.join(MAPPABLE)}"
        )
    return mapping


def _table_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES and not p.name.startswith(".")
    )


def _named_entry(directory: Path, stem: str) -> Path | None:
    """`stem` as a directory or as a table file (`items.parquet`, `items.csv`, ...)."""
    if (directory / stem).is_dir():
        return directory / stem
    for suffix in TABLE_SUFFIXES:
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    return None


def resolve_source(
    data: Path | str,
    items: Path | None = None,
    users: Path | None = None,
    columns: dict[str, str] | None = None,
) -> DataSource:
    """Interpret `--data PATH`.

    PATH is a log file, a directory of log files (one per day, say), or a data set directory
    holding `interactions` (file or directory) beside optional `items` and `users` tables.
    Explicit `items`/`users` paths win over the ones found in a data set directory. A URL
    (`s3://`, `gs://`, `file://`; a prefix, one object or a glob) is a Parquet log read in
    place (features.remote_logs).
    """
    for side in (items, users):
        if side is not None and not side.is_file():
            raise RecsysError(f"{side}: no such file")
    if is_remote_log(data):
        remote = tuple(list_remote_log(str(data)))
        return DataSource(remote, items, users, dict(columns or {}))
    data = Path(data)
    if not data.exists():
        raise RecsysError(f"{data}: no such file or directory")
    if data.is_file():
        logs = [data]
    else:
        interactions = _named_entry(data, "interactions")
        if interactions is not None:
            items = items or _named_entry(data, "items")
            users = users or _named_entry(data, "users")
            logs = [interactions] if interactions.is_file() else _table_files(interactions)
        else:
            logs = _table_files(data)
    for path in logs:
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataValidationError(path, None, f"unsupported file type; use {TABLE_SUFFIXES}")
    if not logs:
        raise RecsysError(f"{data}: no Parquet or CSV interaction files found")
    return DataSource(tuple(logs), items, users, dict(columns or {}))


def _check_utf8(path: Path, chunk_bytes: int = 1 << 22) -> None:
    """Refuse a CSV that is not UTF-8 before Polars reads it: Polars fails half-way
    through a streaming job instead, naming no file (and its executor may print a Rust
    panic beside the error). A streaming decode costs about 0.1 s per 100 MB."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise DataValidationError(
                    path, None, f"not UTF-8 text (invalid byte at offset {offset + exc.start:,})"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataValidationError(path, None, "not UTF-8 text (truncated at the end)") from None


def scan_table(
    path: LogFile, string_columns: tuple[str, ...] = (), columns: dict[str, str] | None = None
) -> pl.LazyFrame:
    """Open one Parquet or CSV file lazily and read its schema, so that a corrupt or empty
    file fails here, with its name, rather than half-way through a job.

    `string_columns` are read from CSV as text (IDs: a CSV has no types, and "007" must
    stay "007"); Parquet keeps the types it stores. `columns` renames the file's columns
    to ours (ours -> theirs).
    """
    columns = columns or {}
    string_columns = tuple(columns.get(c, c) for c in string_columns)
    suffix = path.suffix.lower()
    try:
        if isinstance(path, RemoteFile):  # Parquet, read in place by Polars' cloud reader
            frame = pl.scan_parquet(path.url, hive_partitioning=False)
        elif suffix in PARQUET_SUFFIXES:
            frame = pl.scan_parquet(path)
        else:
            if path.stat().st_size == 0:
                raise DataValidationError(path, None, "file is empty (no header row)")
            _check_utf8(path)
            header = pl.read_csv(
                path, n_rows=0, separator="\t" if suffix == ".tsv" else ","
            ).columns
            frame = pl.scan_csv(
                path,
                separator="\t" if suffix == ".tsv" else ",",
                schema_overrides={c: pl.String for c in string_columns if c in header},
                infer_schema_length=10_000,
            )
        names = frame.collect_schema().names()
    except DataValidationError:
        raise
    except (pl.exceptions.PolarsError, OSError) as exc:
        kind = "Parquet" if suffix in PARQUET_SUFFIXES else "CSV"
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataValidationError(path, None, f"not a readable {kind} file ({problem})") from exc
    renames = {
        theirs: ours for ours, theirs in columns.items() if theirs in names and theirs != ours
    }
    for theirs, ours in renames.items():
        if ours in names:
            raise DataValidationError(
                path, ours, f"the file has both '{ours}' and '{theirs}', which is mapped to it"
            )
    return frame.rename(renames) if renames else frame
