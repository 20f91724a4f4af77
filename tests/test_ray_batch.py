"""`recsys recommend --engine ray`: the same lists as the one-process path (hidden items
left out, unknown users given the popular items), written as Parquet parts by Ray Data
actors on a local Ray of two CPUs; and one line where Ray or the output cannot be had."""

import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from helpers import recsys, small_version

from data.synthetic import SyntheticConfig
from features.catalogue_log import ItemChange, append_change, changes_path
from training.config import TrainConfig

pytestmark = pytest.mark.slow  # builds a model and starts Ray: `make test` only

TIE = 1e-5  # scores this close are a tie: blocks of another shape may order them otherwise


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    artifacts = small_version(
        tmp_path_factory.mktemp("ray"),
        SyntheticConfig(rows=6_000, users=300, items=90, clusters=3, seed=4),
        TrainConfig(max_epochs=1),
    )
    append_change(changes_path(artifacts), ItemChange(5, False, None, time.time()))
    return artifacts


def _same_lists(single: pl.DataFrame, parts: pl.DataFrame) -> None:
    assert parts.schema == single.schema and parts.height == single.height
    joined = single.join(parts, on=["user_id", "rank"], suffix="_ray", how="full", nulls_equal=True)
    assert joined["item_id"].null_count() == 0 and joined["item_id_ray"].null_count() == 0
    gaps = (joined["score"] - joined["score_ray"]).abs()
    assert gaps.max() <= TIE  # type: ignore[operator]
    # where the items differ at a rank, both paths scored that rank the same: a tie
    differ = joined.filter(pl.col("item_id") != pl.col("item_id_ray"))
    assert differ.height <= joined.height // 100


def test_ray_actors_write_the_one_process_lists(artifacts, tmp_path):
    users = tmp_path / "users.csv"
    users.write_text("user_id\n3\n17\nnobody\n250\n3\n")
    single, parts = tmp_path / "single.parquet", tmp_path / "parts"
    common = ["--artifacts", artifacts, "--users", users, "--k", 15]
    done = recsys("recommend", *common, "--out", single)
    assert done.returncode == 0, done.stderr
    on_ray = recsys("recommend", *common, "--out", parts, "--engine", "ray", "--ray-cpus", 2)
    assert on_ray.returncode == 0, on_ray.stderr
    assert "2 Ray actor(s)" in on_ray.stdout
    written = pl.read_parquet(parts / "*.parquet")
    _same_lists(pl.read_parquet(single), written)
    assert 5 not in written["item_id"].to_list()  # the hidden item
    assert written.filter(pl.col("user_id").is_null()).height == 15  # 'nobody': popular


def test_every_user_of_the_version_on_one_cpu(artifacts, tmp_path):
    single, parts = tmp_path / "single.parquet", tmp_path / "parts"
    assert recsys("recommend", "--artifacts", artifacts, "--out", single).returncode == 0
    on_ray = recsys(
        "recommend", "--artifacts", artifacts, "--out", parts, "--engine", "ray", "--ray-cpus", 1
    )
    assert on_ray.returncode == 0, on_ray.stderr
    _same_lists(pl.read_parquet(single), pl.read_parquet(parts / "*.parquet"))


def test_a_file_or_a_used_directory_where_the_parts_would_go_is_refused(artifacts, tmp_path):
    """A second job into a used directory would mix its parts with the first job's."""
    taken = tmp_path / "answers.parquet"
    taken.write_bytes(b"")
    used = tmp_path / "used"
    used.mkdir()
    (used / "part-0.parquet").write_bytes(b"an earlier job's part")
    for out, expected in ((taken, "writes a directory"), (used, "holds files already")):
        done = recsys("recommend", "--artifacts", artifacts, "--out", out, "--engine", "ray")
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert (used / "part-0.parquet").read_bytes() == b"an earlier job's part"


def test_without_ray_the_command_says_how_to_install_it(artifacts, tmp_path):
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "from recsys.cli import app\n"
        f"app(['recommend', '--artifacts', {str(artifacts)!r}, '--out', "
        f"{str(tmp_path / 'out')!r}, '--engine', 'ray'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2 and "pip install 'recsys[ray]'" in done.stderr
