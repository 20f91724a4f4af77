"""`recsys ingest`: validate the logs, collapse duplicates, map IDs to stable indices and
write the cleaned tables, vocabularies, rejects and a manifest.

Runs as two streaming passes over the logs (Polars lazy queries ending in sinks), so a
log larger than memory never has to be held whole.
"""

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from features.config import FeatureConfig
from features.ordering import detect_ordering, row_key
from features.remote_logs import RemoteFile
from features.side_tables import SideFeatures, build_side_features, read_side_table
from features.sources import CSV_SUFFIXES, DataSource, scan_table
from features.validation import ORDER, ValidatedLog, validate_log
from features.vocab import ID, INDEX, Vocabulary
from recsys.core import schema as s
from recsys.core.artifacts import (
    MANIFEST,
    atomic_path,
    read_manifest,
    write_manifest,
    write_parquet,
)
from recsys.core.errors import DataValidationError, RecsysError
from recsys.core.layout import INTERACTIONS, VOCAB

log = logging.getLogger(__name__)

INTERACTIONS_FILE = INTERACTIONS
REJECTS_FILE = "rejects.parquet"
VOCAB_DIR = VOCAB
_CSV_TEXT_COLUMNS = (s.USER_ID, s.ITEM_ID, s.TIMESTAMP, s.WEIGHT, s.EVENT)
_SIDES = {"items": (s.ITEM_ID, s.ITEM_IDX), "users": (s.USER_ID, s.USER_IDX)}


@dataclass
class IngestReport:
    """What one ingest read, kept and refused; printed by the CLI, stored in the manifest."""

    files: int
    read: int
    rejected: int
    duplicates: int
    kept: int
    users: int
    items: int
    new_users: int
    new_items: int
    has_timestamp: bool
    first_timestamp: int | None
    last_timestamp: int | None
    ordering: str = "sequence"  # features.ordering.Ordering: how histories and splits read time
    ordering_reason: str = ""
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    side_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def _vocab_path(out: Path, name: str) -> Path:
    return out / VOCAB_DIR / f"{name}.parquet"


def _side_vocab_path(out: Path, side: str, column: str) -> Path:
    return out / VOCAB_DIR / side / f"{column}.parquet"


def load_vocabularies(directory: Path) -> dict[str, Vocabulary]:
    """The ID vocabularies of an earlier ingest or build, if `directory` holds them."""
    return {
        name: Vocabulary.load(name, _vocab_path(directory, name))
        for name in (s.USER_ID, s.ITEM_ID)
        if _vocab_path(directory, name).is_file()
    }


def _resolved_id_dtypes(logs: list[ValidatedLog]) -> dict[str, pl.DataType]:
    """Integer IDs only if every file stores integers; otherwise text for all files."""
    return {
        c: pl.Int64() if all(v.id_dtypes[c].is_integer() for v in logs) else pl.String()
        for c in s.REQUIRED_COLUMNS
    }


def _open_logs(source: DataSource) -> list[ValidatedLog]:
    logs = []
    for number, path in enumerate(source.interactions):
        text = _CSV_TEXT_COLUMNS if path.suffix.lower() in CSV_SUFFIXES else ()
        frame = scan_table(path, string_columns=text, columns=source.columns)
        logs.append(validate_log(path, frame, number))
    return logs


def _side_features(
    source: DataSource, out: Path, vocabs: dict[str, Vocabulary], config: FeatureConfig
) -> tuple[dict[str, SideFeatures], dict[str, Vocabulary]]:
    """Read the item/user tables; their keys join the ID vocabularies (cold-start rows)."""
    tables = {}
    for side, (key, _) in _SIDES.items():
        path = getattr(source, side)
        if path is not None:
            tables[side] = read_side_table(path, key, source.columns)
            vocabs[key] = vocabs[key].extend(tables[side][0][key])
    features = {}
    for side, (table, null_keys, duplicate_keys) in tables.items():
        key, index = _SIDES[side]
        previous = {
            p.stem: Vocabulary.load(p.stem, p)
            for p in sorted((out / VOCAB_DIR / side).glob("*.parquet"))
        }
        built = build_side_features(table, key, index, vocabs[key], config, previous)
        features[side] = SideFeatures(
            built.key,
            built.index,
            built.raw,
            built.bags,
            built.vocabs,
            built.ignored,
            null_keys,
            duplicate_keys,
        )
    return features, vocabs


def _clean_interactions(
    kept: pl.LazyFrame,
    vocabs: dict[str, Vocabulary],
    id_dtypes: dict[str, pl.DataType],
    event_weights: dict[str, float],
) -> pl.LazyFrame:
    """Collapse duplicate rows, map IDs to indices, resolve the weights of event types
    that have one, and sort each user's events in time."""
    keys = [s.USER_ID, s.ITEM_ID, s.TIMESTAMP, s.WEIGHT, s.EVENT]
    deduplicated = kept.group_by(keys).agg(pl.col(ORDER).min())
    if event_weights:
        weight = pl.col(s.WEIGHT)
        for event, value in event_weights.items():
            weight = pl.when(pl.col(s.EVENT) == event).then(pl.lit(value)).otherwise(weight)
        deduplicated = deduplicated.with_columns(weight.cast(pl.Float32).alias(s.WEIGHT))
    for column, index in ((s.USER_ID, s.USER_IDX), (s.ITEM_ID, s.ITEM_IDX)):
        lookup = vocabs[column].join_key(id_dtypes[column]).rename({ID: column, INDEX: index})
        deduplicated = deduplicated.join(lookup.lazy(), on=column, how="inner")
    # Simultaneous events (and every event of a log without time) are put in a
    # pseudo-random order of (user, item), never in input order: see features.ordering.
    return deduplicated.sort([s.USER_IDX, s.TIMESTAMP, row_key(), ORDER], nulls_last=True).select(
        pl.col(name).cast(dtype) for name, dtype in s.CLEAN_SCHEMA.items()
    )


def _unreadable(logs: list[ValidatedLog], exc: Exception) -> Exception:
    """A read that failed half-way (invalid UTF-8, a malformed row) names no file: find
    the file by reading each alone (only on this error path)."""
    reason = (str(exc).strip().splitlines() or ["unreadable"])[0][:200]
    for log in logs:
        try:
            pl.collect_all([log.kept.select(pl.len()), log.rejects.select(pl.len())])
        except pl.exceptions.ComputeError:
            return DataValidationError(log.path, None, f"cannot read the file ({reason})")
    return exc


def ingest(
    source: DataSource,
    out: Path,
    config: FeatureConfig | None = None,
    previous: Path | None = None,
) -> IngestReport:
    """Run the data layer alone and write its tables into `out`.

    Vocabularies from `previous` (default: `out` itself, if an earlier ingest is there) are
    extended, never renumbered.
    """
    config = config or FeatureConfig()
    started = time.perf_counter()
    logs = _open_logs(source)
    id_dtypes = _resolved_id_dtypes(logs)
    kept = pl.concat(
        [v.kept.with_columns(pl.col(c).cast(id_dtypes[c]) for c in id_dtypes) for v in logs]
    )
    rejects = pl.concat([v.rejects for v in logs])
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the end

    # Pass 1: rejects to disk, the distinct IDs and the row counts.
    with atomic_path(out / REJECTS_FILE) as rejects_tmp:
        try:
            _, users, items, counts, read_counts = pl.collect_all(
                [
                    rejects.sink_parquet(rejects_tmp, lazy=True),
                    kept.select(pl.col(s.USER_ID).unique()),
                    kept.select(pl.col(s.ITEM_ID).unique()),
                    kept.select(pl.len().alias("kept")),
                    pl.concat([v.read for v in logs]).select(pl.col("read").sum()),
                ],
                engine="streaming",
            )
        except pl.exceptions.ComputeError as exc:
            raise _unreadable(logs, exc) from exc
    read = int(read_counts["read"][0])
    valid = int(counts["kept"][0])
    if valid == 0:
        raise RecsysError(
            f"no valid interactions: read {read} rows from {len(logs)} file(s), "
            f"all rejected (see {out / REJECTS_FILE})"
        )

    known = load_vocabularies(previous or out)
    vocabs = {
        column: known.get(column, Vocabulary.empty(column)).extend(ids.to_series())
        for column, ids in ((s.USER_ID, users), (s.ITEM_ID, items))
    }
    side, vocabs = _side_features(source, out, vocabs, config)

    # Pass 2: the cleaned, indexed, time-ordered interactions.
    with atomic_path(out / INTERACTIONS_FILE) as clean_tmp:
        _clean_interactions(kept, vocabs, id_dtypes, config.event_weights).sink_parquet(
            clean_tmp, engine="streaming"
        )
    for column, vocab in vocabs.items():
        vocab.save(_vocab_path(out, column))
    side_summary = _write_side_tables(out, side)

    report = _summarise(out, logs, read, valid, vocabs, known, side_summary)
    report.seconds = round(time.perf_counter() - started, 3)
    write_manifest(
        out,
        {
            "kind": "ingest",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": {
                "interactions": [str(p) for p in source.interactions],
                # objects read in place: what each one was (size, ETag) when it was read
                "remote_files": [
                    p.described() for p in source.interactions if isinstance(p, RemoteFile)
                ],
                "items": str(source.items) if source.items else None,
                "users": str(source.users) if source.users else None,
                "columns": dict(source.columns),
            },
            "id_dtypes": {c: str(vocabs[c].dtype) for c in vocabs},
            "feature_config": asdict(config),
            "summary": asdict(report),
        },
    )
    return report


def _write_side_tables(out: Path, side: dict[str, SideFeatures]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name, features in side.items():
        write_parquet(features.raw, out / f"{name}.parquet")
        write_parquet(features.bags, out / f"{name[:-1]}_features.parquet")
        for column, vocab in features.vocabs.items():
            vocab.save(_side_vocab_path(out, name, column))
        summary[name] = {
            "rows": features.raw.height,
            "rows_without_key": features.null_keys,
            "duplicate_keys": features.duplicate_keys,
            "features": {c: len(v) for c, v in features.vocabs.items()},
            "ignored_columns": features.ignored,
        }
    return summary


def _summarise(
    out: Path,
    logs: list[ValidatedLog],
    read: int,
    valid: int,
    vocabs: dict[str, Vocabulary],
    known: dict[str, Vocabulary],
    side_summary: dict[str, dict[str, Any]],
) -> IngestReport:
    clean = (
        pl.scan_parquet(out / INTERACTIONS_FILE)
        .select(
            pl.len().alias("rows"),
            pl.col(s.TIMESTAMP).min().alias("first"),
            pl.col(s.TIMESTAMP).max().alias("last"),
        )
        .collect()
    )
    by_reason = pl.scan_parquet(out / REJECTS_FILE).group_by("reason").len().collect()
    kept = int(clean["rows"][0])
    ordering = detect_ordering(pl.scan_parquet(out / INTERACTIONS_FILE))
    first, last = clean["first"][0], clean["last"][0]
    return IngestReport(
        files=len(logs),
        read=read,
        rejected=read - valid,
        duplicates=valid - kept,
        kept=kept,
        users=len(vocabs[s.USER_ID]),
        items=len(vocabs[s.ITEM_ID]),
        new_users=len(vocabs[s.USER_ID]) - len(known.get(s.USER_ID, ())),
        new_items=len(vocabs[s.ITEM_ID]) - len(known.get(s.ITEM_ID, ())),
        has_timestamp=any(v.has_timestamp for v in logs),
        first_timestamp=None if first is None else int(first),
        last_timestamp=None if last is None else int(last),
        ordering=ordering.ordering.value,
        ordering_reason=ordering.reason,
        rejects_by_reason=dict(zip(by_reason["reason"], by_reason["len"], strict=True)),
        side_tables=side_summary,
    )


def read_ingested(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an ingest output directory, after checking its files."""
    return read_manifest(directory, verify=verify)
