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
from features.reuse import Reuse, announce, input_identity, plan_reuse, read_every_file
from features.side_tables import SideFeatures, build_side_features, read_side_table
from features.sources import CSV_SUFFIXES, DataSource, scan_table
from features.validation import ValidatedLog, validate_log
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
    reused_files: int = 0  # files an earlier ingest read, taken from its cleaned table
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


def _resolved_id_dtypes(
    logs: list[ValidatedLog], plan: Reuse | None
) -> dict[str, pl.DataType] | None:
    """Integer IDs only if every file stores integers; otherwise text for all files. With
    the files of a previous ingest: None where the new files would change their type
    (integer IDs then text), which only reading every file again gets right."""
    resolved: dict[str, pl.DataType] = {}
    for c in s.REQUIRED_COLUMNS:
        integer = all(v.id_dtypes[c].is_integer() for v in logs)
        if plan is not None:
            earlier = plan.manifest.get("id_dtypes", {}).get(c)
            if earlier not in ("Int64", "String") or (earlier == "Int64" and not integer):
                return None
            integer = earlier == "Int64"
        resolved[c] = pl.Int64() if integer else pl.String()
    return resolved


def _open_logs(source: DataSource, positions: tuple[int, ...]) -> list[ValidatedLog]:
    """The files at `positions` of the source, each numbered by its place in the source."""
    logs = []
    for number in positions:
        path = source.interactions[number]
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


def _indexed_rows(
    kept: pl.LazyFrame,
    vocabs: dict[str, Vocabulary],
    id_dtypes: dict[str, pl.DataType],
    event_weights: dict[str, float],
) -> pl.LazyFrame:
    """Map IDs to indices and resolve the weights of event types that have one."""
    rows = kept
    if event_weights:
        weight = pl.col(s.WEIGHT)
        for event, value in event_weights.items():
            weight = pl.when(pl.col(s.EVENT) == event).then(pl.lit(value)).otherwise(weight)
        rows = rows.with_columns(weight.cast(pl.Float32).alias(s.WEIGHT))
    for column, index in ((s.USER_ID, s.USER_IDX), (s.ITEM_ID, s.ITEM_IDX)):
        lookup = vocabs[column].join_key(id_dtypes[column]).rename({ID: column, INDEX: index})
        rows = rows.join(lookup.lazy(), on=column, how="inner")
    return rows.select(pl.col(name).cast(dtype) for name, dtype in s.CLEAN_SCHEMA.items())


def _clean_interactions(rows: list[pl.LazyFrame]) -> pl.LazyFrame:
    """Collapse duplicate events (equal after their weights are resolved) and sort each
    user's events in time. Simultaneous events (and every event of a log without time)
    are put in a pseudo-random order of (user, item), never in input order (see
    features.ordering), so the table is the same whichever files its rows came from."""
    return (
        pl.concat(rows)
        .unique()
        .sort([s.USER_IDX, s.TIMESTAMP, row_key(), s.ITEM_IDX, s.EVENT, s.WEIGHT], nulls_last=True)
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
    volatile: frozenset[str] = frozenset(),
    reuse: bool = True,
) -> IngestReport:
    """Run the data layer alone and write its tables into `out`.

    Vocabularies from `previous` (default: `out` itself, if an earlier ingest is there) are
    extended, never renumbered. Where `previous` read files that are all still there
    unchanged, its cleaned rows stand in for them and only the other files are read
    (`features.reuse`); `volatile` names inputs read whole every time (they never count as
    read before), and `reuse=False` reads every file.
    """
    config = config or FeatureConfig()
    started = time.perf_counter()
    inputs = [input_identity(p, str(p) in volatile) for p in source.interactions]
    plan = plan_reuse(inputs, previous or out, source.columns, asdict(config)) if reuse else None
    unread = plan.unread if plan else tuple(range(len(source.interactions)))
    logs = _open_logs(source, unread)
    resolved = _resolved_id_dtypes(logs, plan)
    if resolved is None:  # only beside a previous ingest
        read_every_file("the new files change the ID type")
        plan, unread = None, tuple(range(len(source.interactions)))
        logs = _open_logs(source, unread)
        resolved = _resolved_id_dtypes(logs, None)
    assert resolved is not None  # without a previous ingest, always
    id_dtypes = resolved
    before = _previous_rows(plan)
    if plan is not None:
        announce(plan, len(logs))
    kept = [v.kept.with_columns(pl.col(c).cast(id_dtypes[c]) for c in id_dtypes) for v in logs]
    rejects = [v.rejects for v in logs] + before.rejects  # never empty: a source has files
    out.mkdir(parents=True, exist_ok=True)

    # Pass 1: rejects to disk, the distinct IDs and the row counts.
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the end
    rejected = pl.concat([r.select(list(s.REJECT_SCHEMA)) for r in rejects])
    with atomic_path(out / REJECTS_FILE) as rejects_tmp:
        counted = []
        if kept:
            every_kept = pl.concat(kept)
            counted = [
                every_kept.select(pl.col(s.USER_ID).unique()),
                every_kept.select(pl.col(s.ITEM_ID).unique()),
                every_kept.select(pl.len().alias("kept")),
                pl.concat([v.read for v in logs]).select(pl.col("read").sum()),
            ]
        # each volatile input's own counts: the next ingest takes them out of this one's
        changing = [(n, v) for n, v in zip(unread, logs, strict=True) if inputs[n].get("volatile")]
        for _, v in changing:
            counted += [v.read.select(pl.col("read").sum()), v.kept.select(pl.len())]
        try:
            _, *collected = pl.collect_all(
                [rejected.sink_parquet(rejects_tmp, lazy=True), *counted], engine="streaming"
            )
        except pl.exceptions.ComputeError as exc:
            raise _unreadable(logs, exc) from exc
    read, valid = before.read, before.valid
    id_frames: list[pl.DataFrame] = []
    if kept:
        users, items, counts, read_counts = collected[:4]
        read += int(read_counts["read"][0])
        valid += int(counts["kept"][0])
        id_frames = [users, items]
    for (n, _), file_read, file_valid in zip(
        changing, collected[4::2], collected[5::2], strict=True
    ):
        inputs[n] |= {"read": int(file_read.item()), "valid": int(file_valid.item())}
    if valid == 0:
        raise RecsysError(
            f"no valid interactions: read {read} rows from {len(source.interactions)} "
            f"file(s), all rejected (see {out / REJECTS_FILE})"
        )

    known = load_vocabularies(previous or out)
    vocabs = {column: known.get(column, Vocabulary.empty(column)) for column in _SIDES_IDS}
    for column, ids in zip(_SIDES_IDS, id_frames, strict=False):
        vocabs[column] = vocabs[column].extend(ids.to_series())
    side, vocabs = _side_features(source, out, vocabs, config)

    # Pass 2: the cleaned, indexed, time-ordered interactions.
    rows = [_indexed_rows(frame, vocabs, id_dtypes, config.event_weights) for frame in kept]
    with atomic_path(out / INTERACTIONS_FILE) as clean_tmp:
        _clean_interactions(rows + before.clean).sink_parquet(clean_tmp, engine="streaming")
    for column, vocab in vocabs.items():
        vocab.save(_vocab_path(out, column))
    side_summary = _write_side_tables(out, side)

    has_timestamp = before.has_timestamp or any(v.has_timestamp for v in logs)
    report = _summarise(out, len(inputs), has_timestamp, read, valid, vocabs, known)
    report.side_tables = side_summary
    report.reused_files = plan.reused_files if plan else 0
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
                # every file, local ones too: what the next ingest may take as read
                "input_files": inputs,
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


_SIDES_IDS = (s.USER_ID, s.ITEM_ID)


@dataclass(frozen=True)
class _PreviousRows:
    """What the files an earlier ingest read contribute without being read again."""

    clean: list[pl.LazyFrame]
    rejects: list[pl.LazyFrame]
    read: int = 0
    valid: int = 0
    has_timestamp: bool = False


def _previous_rows(plan: Reuse | None) -> _PreviousRows:
    """The previous cleaned rows and rejects, and its counts less those of its volatile
    inputs (read again now, whose rows collapse with the previous ones as duplicates)."""
    if plan is None:
        return _PreviousRows([], [])
    summary, sources = plan.manifest["summary"], plan.manifest["sources"]
    volatile = [
        (name, identity)
        for name, identity in zip(sources["interactions"], sources["input_files"], strict=True)
        if identity.get("volatile")
    ]
    read, valid = int(summary["read"]), int(summary["read"]) - int(summary["rejected"])
    for _, identity in volatile:
        read, valid = read - int(identity["read"]), valid - int(identity["valid"])
    rejects = pl.scan_parquet(plan.directory / REJECTS_FILE)
    return _PreviousRows(
        [pl.scan_parquet(plan.directory / INTERACTIONS_FILE)],
        [rejects.filter(~pl.col("file").is_in([name for name, _ in volatile]))],
        read,
        valid,
        bool(summary["has_timestamp"]),
    )


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
    files: int,
    has_timestamp: bool,
    read: int,
    valid: int,
    vocabs: dict[str, Vocabulary],
    known: dict[str, Vocabulary],
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
        files=files,
        read=read,
        rejected=read - valid,
        duplicates=valid - kept,
        kept=kept,
        users=len(vocabs[s.USER_ID]),
        items=len(vocabs[s.ITEM_ID]),
        new_users=len(vocabs[s.USER_ID]) - len(known.get(s.USER_ID, ())),
        new_items=len(vocabs[s.ITEM_ID]) - len(known.get(s.ITEM_ID, ())),
        has_timestamp=has_timestamp,
        first_timestamp=None if first is None else int(first),
        last_timestamp=None if last is None else int(last),
        ordering=ordering.ordering.value,
        ordering_reason=ordering.reason,
        rejects_by_reason=dict(zip(by_reason["reason"], by_reason["len"], strict=True)),
    )


def read_ingested(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an ingest output directory, after checking its files."""
    return read_manifest(directory, verify=verify)
