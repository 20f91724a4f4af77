"""Ingest end to end on small logs: counts, rejects, duplicates, ID types, rebuilds."""

from pathlib import Path

import polars as pl
import pytest

from features.ingest import INTERACTIONS_FILE, REJECTS_FILE, ingest, load_vocabularies
from features.sources import resolve_source
from recsys.core.artifacts import read_manifest
from recsys.core.errors import DataValidationError, RecsysError


def run(path: Path, out: Path, **side: Path):
    return ingest(resolve_source(path, **side), out)


def decoded(out: Path) -> pl.DataFrame:
    """The cleaned interactions with raw IDs restored through the vocabularies."""
    vocabs = load_vocabularies(out)
    clean = pl.read_parquet(out / INTERACTIONS_FILE)
    users = vocabs["user_id"].ids.gather(clean["user_idx"].to_list())
    items = vocabs["item_id"].ids.gather(clean["item_idx"].to_list())
    return clean.with_columns(users.alias("user_id"), items.alias("item_id"))


def test_counts_add_up_and_bad_rows_are_kept_with_a_reason(write_log, tmp_path):
    log = write_log(
        {
            "user_id": [1, 1, 1, 2, None, 2, 3],
            "item_id": [10, 11, 11, 10, 12, None, 13],
            "timestamp": [5, 6, 6, 7, 8, 9, 10],
        }
    )
    report = run(log, tmp_path / "out")
    assert (report.read, report.rejected, report.duplicates, report.kept) == (7, 2, 1, 4)
    assert report.read == report.kept + report.rejected + report.duplicates
    rejects = pl.read_parquet(tmp_path / "out" / REJECTS_FILE).sort("row")
    assert rejects["reason"].to_list() == ["null user_id", "null item_id"]
    assert rejects["row"].to_list() == [4, 5]
    assert rejects["file"].unique().to_list() == [str(log)]
    assert report.rejects_by_reason == {"null user_id": 1, "null item_id": 1}


def test_events_are_sorted_per_user_in_time(write_log, tmp_path):
    log = write_log({"user_id": [2, 1, 2, 1], "item_id": [1, 2, 3, 4], "timestamp": [9, 8, 1, 2]})
    run(log, tmp_path / "out")
    rows = decoded(tmp_path / "out").select("user_id", "item_id", "timestamp").rows()
    assert rows == [(1, 4, 2), (1, 2, 8), (2, 3, 1), (2, 1, 9)]


def test_missing_column_names_file_and_column(write_log, tmp_path):
    log = write_log({"user": [1], "item_id": [2]})
    with pytest.raises(DataValidationError) as info:
        run(log, tmp_path / "out")
    assert info.value.column == "user_id" and info.value.path == str(log)
    assert "missing" in str(info.value) and "found: user, item_id" in str(info.value)


@pytest.mark.parametrize(
    ("column", "values"),
    [("user_id", [1.5, 2.5]), ("timestamp", [True, False]), ("weight", [[1], [2]])],
)
def test_wrong_column_type_is_a_clear_error(write_log, tmp_path, column, values):
    rows = {"user_id": [1, 2], "item_id": [3, 4], column: values}
    with pytest.raises(DataValidationError) as info:
        run(write_log(rows), tmp_path / "out")
    assert info.value.column == column and "expected" in info.value.problem


def test_empty_csv_file_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataValidationError, match="empty"):
        run(path, tmp_path / "out")


def test_header_only_csv_has_no_valid_interactions(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("user_id,item_id\n")
    with pytest.raises(RecsysError, match="no valid interactions"):
        run(path, tmp_path / "out")


def test_corrupt_parquet_is_refused_with_its_name(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match=r"broken\.parquet"):
        run(path, tmp_path / "out")


def test_csv_timestamps_in_several_layouts(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "user_id,item_id,timestamp,weight\n"
        "u1,a,2024-01-02T00:00:00Z,1\n"
        "u1,b,2024-01-03 00:00:00,2.5\n"
        "u1,c,1704412800,1\n"
        "u1,d,2024-01-06,1\n"
        "u1,e,yesterday,1\n"
        "u1,f,1704412801,-3\n"
        "u1,g,1704412802,abc\n"
    )
    report = run(path, tmp_path / "out")
    assert report.kept == 4
    reasons = pl.read_parquet(tmp_path / "out" / REJECTS_FILE).sort("row")["reason"].to_list()
    assert reasons[0] == "unparsable timestamp"
    assert all(r.startswith("invalid weight") for r in reasons[1:])
    clean = decoded(tmp_path / "out")
    assert clean["item_id"].to_list() == ["a", "b", "c", "d"]
    assert clean["timestamp"].to_list() == [1704153600, 1704240000, 1704412800, 1704499200]
    assert clean["weight"].to_list() == [1.0, 2.5, 1.0, 1.0]


def test_datetime_column_becomes_epoch_seconds(write_log, tmp_path):
    from datetime import datetime

    log = write_log(
        {"user_id": ["a"], "item_id": ["x"], "timestamp": [datetime(2024, 1, 2, 0, 0, 0)]}
    )
    run(log, tmp_path / "out")
    assert decoded(tmp_path / "out")["timestamp"].to_list() == [1704153600]


def test_integer_ids_in_csv_stay_integers_and_text_ids_stay_text(tmp_path):
    (tmp_path / "ints.csv").write_text("user_id,item_id\n7,42\n8,42\n")
    run(tmp_path / "ints.csv", tmp_path / "a")
    assert load_vocabularies(tmp_path / "a")["item_id"].ids.dtype == pl.Int64
    (tmp_path / "text.csv").write_text("user_id,item_id\n007,x\n8,y\n")
    run(tmp_path / "text.csv", tmp_path / "b")
    assert load_vocabularies(tmp_path / "b")["user_id"].ids.to_list() == ["007", "8"]


def test_directory_of_daily_files_with_mixed_formats(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, 2]}).write_parquet(
        logs / "day-1.parquet"
    )
    (logs / "day-2.csv").write_text("user_id,item_id,timestamp\n1,3,3\n3,1,4\n")
    report = run(logs, tmp_path / "out")
    assert (report.files, report.kept, report.users, report.items) == (2, 4, 3, 3)


def test_rebuild_keeps_known_indices_and_appends_unknown_ids(write_log, tmp_path):
    out = tmp_path / "out"
    run(write_log({"user_id": ["b", "a"], "item_id": [5, 3]}, "day1.parquet"), out)
    before = load_vocabularies(out)
    grown = write_log({"user_id": ["b", "a", "c", "0"], "item_id": [5, 3, 9, 1]}, "day2.parquet")
    report = run(grown, out)
    after = load_vocabularies(out)
    assert after["user_id"].ids.to_list() == ["a", "b", "0", "c"]
    assert after["item_id"].ids.to_list() == [3, 5, 1, 9]
    for name in before:
        known = before[name].ids
        assert after[name].ids.head(len(known)).equals(known)
    assert (report.new_users, report.new_items) == (2, 2)


def test_rebuild_with_text_ids_against_integer_vocabulary_fails_clearly(write_log, tmp_path):
    out = tmp_path / "out"
    run(write_log({"user_id": [1], "item_id": [2]}, "a.parquet"), out)
    with pytest.raises(DataValidationError, match="integer IDs"):
        run(write_log({"user_id": [1], "item_id": ["abc"]}, "b.parquet"), out)


def test_manifest_lists_checksums_and_summary(write_log, tmp_path):
    run(write_log({"user_id": [1, 2], "item_id": [3, 4]}), tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["summary"]["kept"] == 2
    assert {"interactions.parquet", "vocab/user_id.parquet"} <= set(manifest["checksums"])


def test_side_tables_add_cold_items_and_features(tmp_path):
    data = tmp_path / "dataset"
    data.mkdir()
    pl.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [1, 2, 1, 3]}).write_parquet(
        data / "interactions.parquet"
    )
    items = pl.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5, 6],
            "title": ["A", "B", "C", "D", "E", "F"],
            "genres": [["x", "y"], ["x"], ["y"], ["x"], ["y"], []],
        }
    )
    items.write_parquet(data / "items.parquet")
    report = run(data, tmp_path / "out")
    assert report.items == 6  # items 4..6 are in the catalogue but not yet in the log
    summary = report.side_tables["items"]
    assert summary["features"] == {"genres": 2}
    assert "title" in summary["ignored_columns"]
    bags = pl.read_parquet(tmp_path / "out" / "item_features.parquet")
    assert bags.height == 6 and bags["genres"].list.len().to_list() == [2, 1, 1, 1, 1, 0]


def test_continuous_columns_become_bucketed_features(tmp_path):
    """A price was dropped as a "continuous Float64 column"; it is a feature now, one
    category per quarter-octave of its value, the same in every build."""
    data = tmp_path / "dataset"
    data.mkdir()
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 3]}).write_parquet(
        data / "interactions.parquet"
    )
    prices = [10.0, 10.5, 20.0, 0.0, None, 999.0]
    pl.DataFrame({"item_id": [1, 2, 3, 4, 5, 6], "price": prices}).write_parquet(
        data / "items.parquet"
    )
    report = run(data, tmp_path / "out")
    assert report.side_tables["items"]["features"] == {"price": 4}  # 4 buckets, null: none
    bags = pl.read_parquet(tmp_path / "out" / "item_features.parquet").sort("item_idx")
    price = bags["price"].to_list()
    assert price[0] == price[1] != price[2]  # 10 and 10.5 share a bucket, 20 does not
    assert price[4] == [] and all(len(b) == 1 for i, b in enumerate(price) if i != 4)
    again = run(data, tmp_path / "again")
    assert again.side_tables == report.side_tables
    rebuilt = pl.read_parquet(tmp_path / "again" / "item_features.parquet").sort("item_idx")
    assert rebuilt["price"].to_list() == price


@pytest.mark.parametrize("form", ["uint64 parquet", "csv text", "csv float text"])
def test_one_out_of_range_timestamp_is_one_rejected_row(tmp_path, form):
    """A timestamp beyond Int64 (1e19) refused the whole ingest with a message naming no
    file; it is one row's reject with a reason."""
    path = tmp_path / ("log.parquet" if form == "uint64 parquet" else "log.csv")
    huge = 10_000_000_000_000_000_000
    if form == "uint64 parquet":
        pl.DataFrame(
            {"user_id": [1, 1, 2], "item_id": [10, 11, 10], "timestamp": [5, huge, 7]},
            schema_overrides={"timestamp": pl.UInt64},
        ).write_parquet(path)
    else:
        stamp = "1e19" if form == "csv float text" else str(huge)
        path.write_text(f"user_id,item_id,timestamp\n1,10,5\n1,11,{stamp}\n2,10,7\n")
    report = run(path, tmp_path / "out")
    assert (report.read, report.kept, report.rejected) == (3, 2, 1)
    assert report.rejects_by_reason == {"unparsable timestamp": 1}
