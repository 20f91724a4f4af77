"""The events write path validates before it stores, acknowledges only what is whole on
disk, and never stores what a reader cannot read back (issue 34, probes 1, 2, 4, 7, 8)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from helpers import private_copy, small_version

from data.synthetic import SyntheticConfig
from features.event_log import (
    QUARANTINED,
    Event,
    SegmentWriter,
    read_new,
    segments,
    snapshot,
)
from serving.event_rows import RowError, parse_event, parse_events
from serving.ids import IdLookup
from training.config import TrainConfig

NOW = 1_700_000_000.0


def _refused(row: dict, integers: bool = True) -> str:
    with pytest.raises(RowError) as caught:
        parse_event(row, integers, integers, NOW)
    return str(caught.value)


@pytest.mark.parametrize("alias", ["9_99", "١٢", "1_0", "007", "+5", "1e3", " 1 2", "0x10"])
def test_integer_ids_are_canonical_never_aliased(alias):
    assert "plain integer" in _refused({"user_id": alias, "item_id": 1})
    assert "plain integer" in _refused({"user_id": 1, "item_id": alias})
    assert parse_event({"user_id": " 12 ", "item_id": "-3"}, True, True, NOW).user_id == 12


def test_text_ids_keep_their_text():
    event = parse_event({"user_id": "9_99", "item_id": "١٢"}, False, False, NOW)
    assert (event.user_id, event.item_id) == ("9_99", "١٢")


@pytest.mark.parametrize(
    "row",
    [
        {"user_id": 1, "item_id": 2, "event": "view\rclick"},
        {"user_id": 1, "item_id": 2, "event": "a\x00b"},
        {"user_id": 1, "item_id": 2, "event": "\ud800"},
        {"user_id": "\ud800", "item_id": 2},
        {"user_id": 1, "item_id": "x" * 257},
        {"user_id": 1, "item_id": 2**64},
        {"user_id": 1, "item_id": 2, "weight": 1e308},
        {"user_id": 1, "item_id": 2, "weight": 10**400},
        {"user_id": 1, "item_id": 2, "weight": float("nan")},
        {"user_id": 1, "item_id": 2, "timestamp": 10**400},
        {"user_id": 1, "item_id": 2, "timestamp": "\ud800"},
        {"user_id": 1, "item_id": 2, "\ud800": 1},
    ],
)
def test_every_field_is_checked_before_a_byte_is_stored(row):
    _refused(row, integers=False) if isinstance(row["user_id"], str) else _refused(row)
    accepted, rejected = parse_events([row, {"user_id": 1, "item_id": 2}], True, True)
    assert len(accepted) == 1 and rejected[0]["index"] == 0  # the good row is kept
    json.dumps(rejected)  # the reasons can be sent back as JSON


def test_a_url_id_that_is_no_canonical_integer_names_nobody():
    lookup = IdLookup(pl.Series([10, 999, 12], dtype=pl.Int64))
    assert lookup.find("10") == 0 and lookup.find(" 10 ") == 0
    assert lookup.find("1_0") is None and lookup.find("9_99") is None
    assert lookup.find("١٢") is None and lookup.find("012") is None


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def test_a_short_write_is_cut_off_and_never_acknowledged(tmp_path):
    """A file-size limit just above the segment: the append fails whole (the segment is as
    before it, no partial line), and the next append goes to a new segment."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from features.event_log import Event, EventStoreError, SegmentWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        writer = SegmentWriter(Path({str(tmp_path / "events")!r}))
        first = writer.append([Event(1, 2, 100)])
        size = first.stat().st_size
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 150, hard))
        try:
            writer.append([Event(u, 7, 200, 1.0, "view") for u in range(100)])
        except EventStoreError as exc:
            print("refused:", exc, file=sys.stderr)
        else:
            sys.exit("a short write was acknowledged")
        assert first.stat().st_size == size, "the failed append left bytes behind"
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        second = writer.append([Event(3, 4, 300)])
        assert second != first, "the next append went to the damaged segment"
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path.cwd()
    )
    assert done.returncode == 0, done.stderr
    assert "refused: " in done.stderr and "events not stored" in done.stderr
    found = segments(tmp_path / "events")
    assert len(found) == 2
    events = [e for path in found for e in read_new(path, 0)[0]]
    assert sorted((e.user_id, e.item_id) for e in events) == [("1", "2"), ("3", "4")]
    assert all(path.read_bytes().endswith(b"\n") for path in found)


def _plant_bad_segment(directory: Path) -> Path:
    """A segment as an older version could write it: an unquoted CR in the event field,
    bytes that are not UTF-8, a line with too few fields, weights and timestamps a post
    could not carry (NaN, negative, past the largest weight or year 9999), between good
    lines."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "20260101T000000-old-1-deadbeef.csv"
    path.write_bytes(
        b"user_id,item_id,timestamp,weight,event\n"
        b"1,2,100,1.0,view\n"
        b"1,3,100,1.0,vi\rew\n"
        b"1,\xff\xfe,100,1.0,\n"
        b"1,4\n"
        b"1,5,notatime,1.0,\n"
        b"1,7,100,NaN,\n"
        b"1,8,100,-3,\n"
        b"1,9,100,inf,\n"
        b"1,10,100,1e9,\n"
        b"1,11,-5,1.0,\n"
        b"1,12,999999999999,1.0,\n"
        b"2,6,100,1.0,\n"
    )
    return path


def test_readers_quarantine_lines_they_cannot_parse(tmp_path):
    path = _plant_bad_segment(tmp_path / "events")
    before = QUARANTINED["lines"]
    events, end = read_new(path, 0)
    assert [(e.user_id, e.item_id) for e in events] == [("1", "2"), ("2", "6")]
    assert end == path.stat().st_size
    assert QUARANTINED["lines"] - before == 10  # the weight and timestamp rules of a post too
    taken = snapshot(tmp_path / "events", tmp_path / "snapshot.parquet")
    assert taken.rows == 2 and taken.path is not None
    frame = pl.read_parquet(taken.path)
    assert frame["item_id"].to_list() == [2, 6] and frame["weight"].is_finite().all()


def test_an_event_written_whole_reads_back_whatever_its_text(tmp_path):
    writer = SegmentWriter(tmp_path / "events")
    odd = [Event('a,"b"', "c d", 1, 0.5, "add to cart"), Event("é", "x\ty", 2)]
    writer.append(odd)
    events, _ = read_new(writer.path, 0)  # type: ignore[arg-type]
    assert [(e.user_id, e.item_id, e.event) for e in events] == [
        ('a,"b"', "c d", "add to cart"),
        ("é", "x\ty", None),
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("event_writes"),
        SyntheticConfig(rows=6_000, users=150, items=100, clusters=4, seed=3),
        TrainConfig(max_epochs=1),
    )


@pytest.mark.slow
def test_a_bad_stored_line_neither_stops_a_restart_nor_a_build(built, tmp_path):
    from test_events import _rebuild

    from recsys.core.versions import VersionStore
    from serving.app import create_app
    from serving.settings import ServiceSettings

    artifacts = private_copy(built, tmp_path)
    _plant_bad_segment(artifacts / "events")
    settings = ServiceSettings(artifacts=artifacts, redis_url=None)
    with TestClient(create_app(settings)) as client:  # the restart
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/users/1/recommendations").status_code == 200
        posted = client.post("/v1/events", json={"events": [{"user_id": 1, "item_id": 7}]})
        assert posted.status_code == 202
    new = _rebuild(artifacts, built.parent / "data")
    assert VersionStore(artifacts).current_name() == new.version


@pytest.mark.slow
def test_a_huge_weight_in_a_log_is_rejected_at_ingest(built, tmp_path, write_log):
    from features.ingest import ingest
    from features.sources import resolve_source

    log = write_log(
        {"user_id": [1, 1, 2], "item_id": [1, 2, 1], "weight": [1e308, 1e308, 2.0]},
    )
    result = ingest(resolve_source(log), tmp_path / "out")
    kept = pl.read_parquet(tmp_path / "out" / "interactions.parquet")
    assert kept.height == 1 and np.isfinite(kept["weight"].to_numpy()).all()
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert set(rejects["reason"]) == {"weight above 1e+06"}
    assert result is not None
