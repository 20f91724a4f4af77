"""The `recsys` command as a user runs it: a subprocess, its output and its exit code."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers import recsys


def test_ingest_prints_read_kept_rejected(tmp_path: Path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n1,2,3\n1,2,3\n,5,6\n4,5,zz\n7,8,9\n")
    result = recsys("ingest", "--data", log, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    cells = {}
    for line in result.stdout.splitlines():  # table rows: │ name │ value │
        parts = [p.strip() for p in line.strip().strip("│").split("│")]
        if len(parts) == 2:
            cells[parts[0]] = parts[1]
    assert cells["rows read"] == "5" and cells["rows kept"] == "2", result.stdout
    assert cells["rows rejected"] == "2", result.stdout
    assert cells["duplicates collapsed"] == "1", result.stdout
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


def test_unreadable_files_fail_in_one_short_line_naming_the_file(tmp_path: Path):
    """A 1M-column header printed an 8.9 MB line, a binary file echoed raw bytes, and
    invalid UTF-8 named no file."""
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(1_000_000)) + "\n" + "1," * 999_999 + "1\n")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes((i * 7919) % 256 for i in range(5_000)))
    bad_utf8 = tmp_path / "bad_utf8.csv"
    bad_utf8.write_bytes(b"user_id,item_id\n1,\xff\xfe\n2,3\n")
    for path in (wide, binary, bad_utf8):
        result = recsys("ingest", "--data", path, "--out", tmp_path / "out")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and len(lines[0]) < 600 and str(path) in lines[0], lines
        assert lines[0].isprintable()


def test_a_log_that_collapses_to_one_item_is_not_built(tmp_path: Path):
    """It was promoted as a version; it is refused in one line, and nothing is current."""
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n1,5\n1,5\n,6\n1,5\n")
    result = recsys("build", "--data", log, "--artifacts", tmp_path / "artifacts")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # after the settings the build prints
    assert last.startswith("error: nothing to recommend") and "Traceback" not in result.stderr
    assert not (tmp_path / "artifacts" / "current").exists()


def test_doctor_names_each_check_and_fails_on_a_bad_one(tmp_path: Path, redis_url: str):
    (tmp_path / "artifacts").mkdir()
    good = recsys("doctor", "--artifacts", tmp_path / "artifacts", "--redis-url", redis_url)
    assert good.returncode == 0, good.stdout
    names = [line.split(":")[0].split()[-1] for line in good.stdout.strip().splitlines()]
    assert names == ["versions", "imports", "cuda", "redis", "artifacts"]
    assert all(line.startswith("ok") for line in good.stdout.strip().splitlines())
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    bad = recsys("doctor", "--artifacts", blocked / "sub", "--redis-url", "redis://127.0.0.1:1/0")
    assert bad.returncode == 1
    failed = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failed] == ["FAIL redis", "FAIL artifacts"]
    missing = recsys("doctor", "--artifacts", tmp_path / "typo", "--redis-url", redis_url)
    assert missing.returncode == 1 and "does not exist" in missing.stdout
    assert not (tmp_path / "typo").exists()  # probe: doctor said ok and created it


def test_doctor_names_a_version_mismatch():
    from unittest import mock

    from recsys import doctor

    versions = {"torch": "2.13.0", "fbgemm-gpu-cpu": "1.9.0", "torchrec": "1.8.0"}

    def fake(name: str) -> str:
        if name not in versions:
            raise doctor.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    with mock.patch.object(doctor.importlib.metadata, "version", fake):
        ok, detail = doctor.check_versions()
    assert not ok and "needs fbgemm-gpu 1.8.x" in detail


def test_a_log_with_its_own_column_names_is_mapped(tmp_path: Path):
    """customer_id / sku / ts needed a rewrite of the log; --columns maps them, the item
    table's key included."""
    data = tmp_path / "shop"
    data.mkdir()
    pl.DataFrame(
        {"customer_id": ["a", "a", "b"], "sku": ["x", "y", "x"], "ts": [1, 2, 3]}
    ).write_csv(data / "interactions.csv")
    pl.DataFrame({"sku": ["x", "y", "z"], "brand": ["p", "q", "p"]}).write_csv(data / "items.csv")
    mapping = "user_id=customer_id,item_id=sku,timestamp=ts"
    result = recsys("ingest", "--data", data, "--out", tmp_path / "out", "--columns", mapping)
    assert result.returncode == 0, result.stderr
    clean = pl.read_parquet(tmp_path / "out" / "interactions.parquet")
    assert clean.height == 3 and clean["timestamp"].to_list() == [1, 2, 3]
    items = pl.read_parquet(tmp_path / "out" / "vocab" / "item_id.parquet")
    assert sorted(items["id"].to_list()) == ["x", "y", "z"]  # the catalogue's z too
    bad = recsys("ingest", "--data", data, "--out", tmp_path / "o2", "--columns", "userid=x")
    assert bad.returncode == 2 and "cannot map column(s) userid" in bad.stderr


def test_device_cuda_is_refused_with_the_reason_before_any_work(tmp_path: Path):
    """A GPU with the CPU build of fbgemm (what `make setup` installs) has no kernels to
    train with; it is refused up front, naming the package. Other builds pass."""
    from training.parallel import cuda_problem

    assert cuda_problem(True, "cuda") is None
    assert cuda_problem(True, "rocm") is None and cuda_problem(True, "INTERNAL") is None
    assert "no CUDA device" in str(cuda_problem(False, "cuda"))
    wrong_build = str(cuda_problem(True, "cpu"))
    assert "fbgemm-gpu" in wrong_build and "cpu build" in wrong_build
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n1,5\n1,6\n2,5\n")
    result = recsys("build", "--data", log, "--artifacts", tmp_path / "a", "--device", "cuda")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device cuda")
    assert not (tmp_path / "a").exists()


def test_help_texts_keep_their_square_brackets():
    """Rich reads "[tower]" in a help text as markup and drops it: `recsys build --help`
    showed "Build settings as TOML (, , , , )". Every help text escapes its brackets."""
    import re

    import typer
    from typer.testing import CliRunner

    from recsys.cli import app

    def commands(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, [*path, name])

    for path, command in commands(typer.main.get_command(app), []):
        for text in [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]:
            assert not re.search(r"(?<!\\)\[[a-z_]+\]", text), (path, text)
    shown = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "240"}).output
    assert "[tower], [train], [index]" in shown, shown


WIDE = {"COLUMNS": "240"}  # the summary table's cells on one line each


def _one_event_each(path: Path, users: int) -> Path:
    """A log in which every user has one event: nothing is left to validate on."""
    items = [i % 40 for i in range(users)]
    pl.DataFrame({"user_id": range(users), "item_id": items, "timestamp": range(users)}).write_csv(
        path
    )
    return path


@pytest.mark.slow  # two builds
def test_a_log_without_validation_events_builds_and_rebuilds(tmp_path: Path):
    """The build was promoted, then its summary raised KeyError on `hit_rate@10` (exit 1)
    and the manifest held the epoch number as `recall@20`; the rebuild's gate then failed
    on an empty evaluation. Both say there was nothing to validate on, and are promoted."""
    art = tmp_path / "art"
    first = recsys(
        "build",
        *("--data", _one_event_each(tmp_path / "one.csv", 200), "--artifacts", art),
        *("--epochs", "2", "--set", "tower.members=1", "--no-progress"),
        env_extra=WIDE,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no validation events" in first.stdout
    manifest = json.loads((art / "current" / "manifest.json").read_text())
    assert manifest["train"]["valid_metrics"] == {}
    second = recsys(
        "build",
        *("--data", _one_event_each(tmp_path / "more.csv", 260), "--artifacts", art),
        *("--epochs", "2", "--set", "tower.members=1", "--no-progress"),
        env_extra=WIDE,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    gate = json.loads((art / "current" / "manifest.json").read_text())["gate"]
    assert gate["promoted"] and gate["users"] == 0 and "no validation users" in gate["reason"]
    assert "quality gate: cannot compare: no validation users" in second.stderr
    assert (art / "current").resolve().name != manifest["version"]
