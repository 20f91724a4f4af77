"""The `recsys` command as a user runs it: a subprocess, its output and its exit code."""

from pathlib import Path

import polars as pl
from helpers import recsys


def test_ingest_prints_read_kept_rejected(tmp_path: Path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n1,2,3\n1,2,3\n,5,6\n4,5,zz\n7,8,9\n")
    result = recsys("ingest", "--data", log, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for line in ("rows read │ 5", "rows kept │ 2", "rows rejected │ 2", "collapsed │ 1"):
        assert line in " ".join(result.stdout.split()).replace(" │ ", " │ ")
    assert (tmp_path / "out" / "interactions.parquet").is_file()


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path: Path):
    log = tmp_path / "log.parquet"
    pl.DataFrame({"uid": [1], "item_id": [2]}).write_parquet(log)
    result = recsys("ingest", "--data", log, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "log.parquet, column 'user_id': required column is missing" in result.stderr


def test_missing_path_is_a_clear_error(tmp_path: Path):
    result = recsys("ingest", "--data", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.returncode == 2 and "no such file or directory" in result.stderr


def test_synth_then_ingest(tmp_path: Path):
    assert recsys("data", "synth", "--rows", "5000", "--out", tmp_path / "d").returncode == 0
    result = recsys("ingest", "--data", tmp_path / "d", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "items table" in result.stdout and "genres" in result.stdout
