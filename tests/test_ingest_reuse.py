"""A rebuild over a log that grew by new files reads only those (features.reuse), and its
tables equal what reading every file gives; whatever could make them differ (a file read
before that changed or went, other settings, IDs that turn to text) reads every file."""

from pathlib import Path

import polars as pl
import pytest

from features import ingest as ingest_module
from features.config import FeatureConfig
from features.event_log import EventSnapshot
from features.ingest import INTERACTIONS_FILE, REJECTS_FILE, ingest, load_vocabularies
from features.sources import resolve_source
from recsys.core.artifacts import read_manifest
from recsys.core.errors import DataValidationError
from recsys.core.layout import POSTED_EVENTS
from recsys.pipeline import _posted_events_kept

DAY_1 = {
    "user_id": [1, 1, 2, 3],
    "item_id": [10, 11, 10, 12],
    "timestamp": [5, 6, 7, 8],
    "weight": [1.0, 2.0, 1.0, 1.0],
    "event": ["view", "buy", "view", "view"],
}
DAY_2 = {
    "user_id": [2, 4, None],
    "item_id": [11, 13, 10],
    "timestamp": [9, 9, 9],
    "weight": [1.0, 1.0, 1.0],
    "event": ["view", "view", "view"],
}
DAY_3 = {  # a repeat of day 1's event, the same event at another weight, a reject, new IDs
    "user_id": [1, 1, 5, 5, None],
    "item_id": [10, 11, 14, 10, 11],
    "timestamp": [5, 6, 10, 11, 12],
    "weight": [1.0, 7.0, 1.0, 1.0, 1.0],
    "event": ["view", "buy", "view", "view", "view"],
}


def write_day(root: Path, day: int, rows: dict) -> Path:
    path = root / f"date=2026-12-0{day}" / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, strict=False).write_parquet(path)
    return path


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The log files the ingest opens, in order."""
    seen: list[str] = []
    scan = ingest_module.scan_table

    def recorded(path, *args, **kwargs):
        seen.append(str(path))
        return scan(path, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "scan_table", recorded)
    return seen


def tables(out: Path) -> dict[str, object]:
    """Everything an ingest writes that a build reads, and its counts."""
    summary = read_manifest(out)["summary"]
    return {
        "interactions": pl.read_parquet(out / INTERACTIONS_FILE).rows(),
        "rejects": sorted(pl.read_parquet(out / REJECTS_FILE).rows(), key=str),
        "vocabularies": {k: v.ids.to_list() for k, v in load_vocabularies(out).items()},
        "counts": {k: v for k, v in summary.items() if k not in ("seconds", "reused_files")},
    }


@pytest.fixture
def grown(tmp_path: Path) -> tuple[Path, Path]:
    """A log of two days ingested once, then a third day written beside them."""
    logs = tmp_path / "logs"
    write_day(logs, 1, DAY_1)
    write_day(logs, 2, DAY_2)
    ingest(resolve_source(logs), tmp_path / "first")
    write_day(logs, 3, DAY_3)
    return logs, tmp_path / "first"


def test_a_rebuild_reads_only_the_new_files_and_equals_reading_them_all(grown, opened, tmp_path):
    logs, first = grown
    report = ingest(resolve_source(logs), tmp_path / "again", previous=first)
    assert report.reused_files == 2 and report.files == 3
    assert [Path(p).parent.name for p in opened] == ["date=2026-12-03"]
    full = ingest(resolve_source(logs), tmp_path / "full", previous=first, reuse=False)
    assert full.reused_files == 0
    assert tables(tmp_path / "again") == tables(tmp_path / "full")
    assert (report.read, report.rejected, report.duplicates) == (12, 2, 1)


def test_a_rebuild_with_no_new_file_reads_none(grown, opened, tmp_path):
    logs, first = grown
    (logs / "date=2026-12-03" / "part-0.parquet").unlink()
    report = ingest(resolve_source(logs), tmp_path / "again", previous=first)
    assert report.reused_files == 2 and opened == []
    again, before = tables(tmp_path / "again"), tables(first)
    for counts in (again["counts"], before["counts"]):
        del counts["new_users"], counts["new_items"]  # type: ignore[attr-defined]
    assert again == before


def test_an_ingest_into_its_own_directory_builds_on_itself(grown, opened):
    logs, first = grown
    before = tables(first)
    assert ingest(resolve_source(logs), first).reused_files == 2
    assert len(tables(first)["interactions"]) == len(before["interactions"]) + 3  # type: ignore[arg-type]


def _changed_file(logs: Path) -> None:
    write_day(logs, 1, DAY_1 | {"weight": [3.0, 2.0, 1.0, 1.0]})


def _gone_file(logs: Path) -> None:
    (logs / "date=2026-12-02" / "part-0.parquet").unlink()


@pytest.mark.parametrize(
    ("change", "config"),
    [
        (_changed_file, FeatureConfig()),
        (_gone_file, FeatureConfig()),
        (lambda logs: None, FeatureConfig(event_weights={"buy": 4.0})),
    ],
    ids=[
        "a file read before changed",
        "a file read before is gone",
        "other event weights",
    ],
)
def test_what_could_change_the_tables_reads_every_file(grown, opened, tmp_path, change, config):
    logs, first = grown
    change(logs)
    report = ingest(resolve_source(logs), tmp_path / "again", config, previous=first)
    assert report.reused_files == 0 and len(opened) == report.files
    ingest(resolve_source(logs), tmp_path / "full", config, previous=first, reuse=False)
    assert tables(tmp_path / "again") == tables(tmp_path / "full")


def test_text_ids_take_new_files_of_integer_ids_as_text(tmp_path, opened):
    logs = tmp_path / "logs"
    write_day(logs, 1, DAY_1 | {"user_id": ["a", "a", "b", "c"]})
    ingest(resolve_source(logs), tmp_path / "first")
    write_day(logs, 2, DAY_2)
    assert (
        ingest(resolve_source(logs), tmp_path / "again", previous=tmp_path / "first").reused_files
        == 1
    )
    ingest(resolve_source(logs), tmp_path / "full", previous=tmp_path / "first", reuse=False)
    assert tables(tmp_path / "again") == tables(tmp_path / "full")
    assert load_vocabularies(tmp_path / "again")["user_id"].ids.to_list()[-1] == "4"


def test_integer_ids_that_turn_to_text_are_refused_as_reading_every_file_refuses_them(
    grown, tmp_path
):
    logs, first = grown
    write_day(logs, 3, DAY_3 | {"user_id": ["1", "1", "u5", "u5", None]})
    for reuse in (True, False):
        with pytest.raises(DataValidationError, match="holds integer IDs, the new data has text"):
            ingest(resolve_source(logs), tmp_path / str(reuse), previous=first, reuse=reuse)


def test_a_damaged_previous_table_is_never_built_on(grown, opened, tmp_path):
    logs, first = grown
    (first / INTERACTIONS_FILE).write_bytes(b"not the table that was written")
    assert ingest(resolve_source(logs), tmp_path / "again", previous=first).reused_files == 0
    assert len(opened) == 3


def test_duplicates_collapse_as_the_events_they_become(write_log, tmp_path):
    """Two rows that differ only in a weight their event type overrides are one event."""
    log = write_log(
        {
            "user_id": [1, 1, 2],
            "item_id": [5, 5, 5],
            "weight": [1.0, 2.0, 1.0],
            "event": ["buy"] * 3,
        }
    )
    report = ingest(
        resolve_source(log), tmp_path / "out", FeatureConfig(event_weights={"buy": 3.0})
    )
    assert (report.kept, report.duplicates) == (2, 1)


def _snapshot(path: Path, rows: dict) -> EventSnapshot:
    pl.DataFrame(rows, strict=False).write_parquet(path)
    return EventSnapshot(path, {}, len(rows["user_id"]))


@pytest.mark.parametrize(
    ("now", "kept"),
    [
        ({"user_id": ["1", "2", "3"], "item_id": ["7", "8", "9"]}, True),
        ({"user_id": ["2", "3"], "item_id": ["8", "9"]}, False),  # the first was pruned
        (None, False),  # every segment pruned
    ],
    ids=["every event still posted", "one pruned", "all pruned"],
)
def test_a_previous_version_is_built_on_only_while_its_posted_events_are_kept(tmp_path, now, kept):
    """A version's cleaned rows hold the posted events it read: where `recsys events prune`
    removed some since, they must leave the next version, so every file is read."""
    previous = tmp_path / "versions" / "v1"
    previous.mkdir(parents=True)
    _snapshot(previous / POSTED_EVENTS, {"user_id": ["1", "2"], "item_id": ["7", "8"]})
    snapshot = (
        EventSnapshot(None, {}, 0) if now is None else _snapshot(tmp_path / "now.parquet", now)
    )
    assert _posted_events_kept(previous, snapshot) is kept
    assert _posted_events_kept(None, snapshot) is True


def test_posted_events_read_again_count_once(grown, opened, tmp_path):
    """The posted-events snapshot is read whole by every build: the previous one's rows,
    rejects and counts give way to the new snapshot's, which holds them again."""
    logs, _ = grown
    first_posted = tmp_path / "posted-1.parquet"
    posted = {"user_id": [1, 9, None], "item_id": [12, 10, 10], "timestamp": [20, 21, 22]}
    pl.DataFrame(posted, strict=False).write_parquet(first_posted)
    source = resolve_source(logs)
    with_posted = type(source)((*source.interactions, first_posted), columns=source.columns)
    ingest(with_posted, tmp_path / "v1", volatile=frozenset({str(first_posted)}))
    second_posted = tmp_path / "posted-2.parquet"
    more = {k: [*v, v[0]] for k, v in posted.items()} | {"timestamp": [20, 21, 22, 30]}
    pl.DataFrame(more, strict=False).write_parquet(second_posted)
    write_day(logs, 4, DAY_2 | {"timestamp": [40, 41, 42]})
    source = resolve_source(logs)
    grown_more = type(source)((*source.interactions, second_posted), columns=source.columns)
    volatile = frozenset({str(second_posted)})
    opened.clear()
    report = ingest(grown_more, tmp_path / "v2", previous=tmp_path / "v1", volatile=volatile)
    assert report.reused_files == 3
    assert [Path(p).name for p in opened] == ["part-0.parquet", "posted-2.parquet"]
    full = tmp_path / "full"
    ingest(grown_more, full, previous=tmp_path / "v1", volatile=volatile, reuse=False)
    assert tables(tmp_path / "v2") == tables(full)
