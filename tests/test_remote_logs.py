"""Interaction logs on object storage, read in place (features.remote_logs), on a real S3
API (moto's server) and a file:// URL: the same ingest as the same files on local disk,
hive partitions, globs, marker files left out, the files' sizes and ETags in the manifest,
a rebuild that repeats the URL, and one line for what cannot be read."""

import io
import json
from pathlib import Path

import polars as pl
import pytest
import s3fs
from helpers import recsys

from data.synthetic import SyntheticConfig, generate

pytestmark = pytest.mark.slow  # a model build and an S3 server: `make test` only

DAYS = ("2026-12-01", "2026-12-02", "2026-12-03")


@pytest.fixture(scope="module")
def local_log(tmp_path_factory) -> Path:
    """A synthetic log split by day into hive partitions, on local disk."""
    root = tmp_path_factory.mktemp("remote-logs")
    generate(root / "generated", SyntheticConfig(rows=3_000, users=60, items=40, seed=6))
    log = pl.read_parquet(root / "generated" / "interactions" / "*.parquet")
    parts = root / "logs"
    for n, day in enumerate(DAYS):
        part = parts / f"date={day}"
        part.mkdir(parents=True)
        log.gather_every(len(DAYS), n).write_parquet(part / "part-0.parquet")
    return parts


def _upload(local: Path, url: str) -> None:
    fs = s3fs.S3FileSystem()
    prefix = url.removeprefix("s3://")
    for path in sorted(local.rglob("*.parquet")):
        fs.put_file(str(path), f"{prefix}/{path.relative_to(local)}")
    fs.pipe_file(f"{prefix}/_SUCCESS", b"")  # a job's marker: not a log file


def _ingested(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "interactions.parquet").sort(pl.all())


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_log_on_s3_ingests_as_the_same_files_on_disk(local_log, bucket, tmp_path):
    logs = f"{bucket}/logs"
    _upload(local_log, logs)
    on_disk, on_s3 = tmp_path / "disk", tmp_path / "s3"
    assert recsys("ingest", "--data", local_log, "--out", on_disk).returncode == 0
    done = recsys("ingest", "--data", f"{logs}/", "--out", on_s3)
    assert done.returncode == 0, done.stderr
    assert _ingested(on_s3).equals(_ingested(on_disk))
    sources = _manifest(on_s3)["sources"]
    assert [f["url"] for f in sources["remote_files"]] == [
        f"{logs}/date={day}/part-0.parquet" for day in DAYS
    ]
    sizes = [(local_log / f"date={day}" / "part-0.parquet").stat().st_size for day in DAYS]
    assert [f["size"] for f in sources["remote_files"]] == sizes
    assert all(f["etag"] for f in sources["remote_files"])


def test_a_glob_reads_only_the_partitions_it_names(local_log, bucket, tmp_path):
    logs = f"{bucket}/logs"
    _upload(local_log, logs)
    done = recsys("ingest", "--data", f"{logs}/date=2026-12-0[12]/*.parquet", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    files = _manifest(tmp_path)["sources"]["remote_files"]
    assert [f["url"].split("/")[-2] for f in files] == ["date=2026-12-01", "date=2026-12-02"]


def test_a_build_remembers_the_url_and_a_plain_rebuild_reads_only_a_new_partition(
    local_log, bucket, tmp_path
):
    logs = f"{bucket}/logs/"
    _upload(local_log, logs.rstrip("/"))
    artifacts = tmp_path / "artifacts"
    first = recsys("build", "--artifacts", artifacts, "--data", logs, "--epochs", 1)
    assert first.returncode == 0, first.stderr
    day = pl.read_parquet(local_log / f"date={DAYS[0]}" / "part-0.parquet").head(50)
    s3fs.S3FileSystem().pipe_file(
        f"{logs.removeprefix('s3://')}date=2026-12-04/part-0.parquet", _parquet_bytes(day)
    )
    again = recsys("build", "--artifacts", artifacts, "--epochs", 1, "--no-gate")
    assert again.returncode == 0, again.stderr
    assert f"{len(DAYS)} file(s) unchanged since the previous ingest" in again.stderr
    newest = sorted((artifacts / "versions").iterdir())[-1]
    manifest = _manifest(newest / "data")
    assert manifest["sources"]["interactions"][0].startswith(logs)
    assert len(manifest["sources"]["remote_files"]) == len(DAYS) + 1
    assert manifest["summary"]["reused_files"] == len(DAYS)
    assert manifest["summary"]["read"] == 3_000 + 50


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def test_a_file_url_reads_a_local_data_set_in_place(local_log, tmp_path):
    done = recsys("ingest", "--data", f"file://{local_log}", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(_manifest(tmp_path)["sources"]["remote_files"]) == len(DAYS)


def test_what_cannot_be_read_in_place_is_one_line(local_log, bucket, tmp_path):
    fs = s3fs.S3FileSystem()
    prefix = bucket.removeprefix("s3://")
    fs.pipe_file(f"{prefix}/csv/log.csv", b"user_id,item_id\n1,2\n")
    fs.pipe_file(f"{prefix}/broken/log.parquet", b"not parquet at all")
    for url, expected in (
        (f"{bucket}/csv/", "convert CSV to Parquet"),
        (f"{bucket}/nothing-here/", "no Parquet interaction files found"),
        (f"{bucket}/broken/", f"{bucket}/broken/log.parquet: not a readable Parquet file"),
    ):
        done = recsys("ingest", "--data", url, "--out", tmp_path / "out")
        assert done.returncode == 2, (url, done.stdout, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr
