"""`recsys build`, `recsys recommend` and `recsys evaluate` as a user runs them."""

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import recsys

from data.synthetic import SyntheticConfig, generate
from recsys.core.artifacts import read_manifest
from recsys.core.versions import VersionStore
from serving.index import ExactRetriever, recall_against_exact
from serving.recommender import Recommender

pytestmark = pytest.mark.slow  # builds models or runs the service: `make test` only


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("build")
    generate(
        root / "data",
        SyntheticConfig(rows=15_000, users=300, items=200, clusters=5, taste=0.9, seed=4),
    )
    result = recsys(
        "build",
        "--data",
        root / "data",
        "--artifacts",
        root / "artifacts",
        "--epochs",
        "3",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "valid hit_rate@10" in result.stdout
    return root / "data", root / "artifacts"


def test_build_writes_a_complete_promoted_version(built):
    _, artifacts = built
    store = VersionStore(artifacts)
    version = store.current()
    manifest = read_manifest(version)  # verifies every checksum
    for name in (
        "model/weights.safetensors",
        "model/model.json",
        "model/metrics.jsonl",
        "model/training_curve.png",
        "embeddings/items.parquet",
        "index/items.ann",
        "data/vocab/item_id.parquet",
    ):
        assert name in manifest["checksums"], name
    assert manifest["embedding_dim"] == 64 * manifest["members"]
    assert manifest["similarity"] == "cosine"
    assert manifest["index"]["recall_at_100"] >= 0.95
    assert manifest["train"]["valid_metrics"]["hit_rate@10"] > 0.2
    epochs = [
        json.loads(line) for line in (version / "model/metrics.jsonl").read_text().splitlines()
    ]
    assert max(e["epoch"] for e in epochs) == manifest["train"]["epochs_run"]
    if manifest["members"] > 1:  # an ensemble: every member's epochs, each named
        assert {e["member"] for e in epochs} == set(range(manifest["members"]))
    assert not list(version.rglob("*.pt")) and not list(version.rglob("*.pkl"))


def test_recommend_excludes_seen_items_and_ranks(built, tmp_path):
    data, artifacts = built
    out = tmp_path / "recs.parquet"
    result = recsys(
        "recommend", "--artifacts", artifacts, "--users", "all", "--k", "7", "--out", out
    )
    assert result.returncode == 0, result.stderr
    recs = pl.read_parquet(out)
    assert recs.columns == ["user_id", "item_id", "rank", "score"]
    assert recs.group_by("user_id").len()["len"].unique().to_list() == [7]
    log = pl.read_parquet(data / "interactions").select("user_id", "item_id").unique()
    assert recs.join(log, on=["user_id", "item_id"], how="inner").height == 0
    first = recs.filter(pl.col("user_id") == recs["user_id"][0]).sort("rank")
    assert first["rank"].to_list() == list(range(1, 8))
    assert first["score"].is_sorted(descending=True)


def test_recommend_for_a_file_of_users_with_an_unknown_one(built, tmp_path):
    _, artifacts = built
    users = tmp_path / "users.csv"
    users.write_text("user_id\n0\n123456789\n")
    out = tmp_path / "recs.parquet"
    result = recsys(
        "recommend", "--artifacts", artifacts, "--users", users, "--k", "3", "--out", out
    )
    assert result.returncode == 0, result.stderr
    assert "+1 unknown users" in " ".join(result.stdout.split())
    assert sorted(pl.read_parquet(out)["user_id"].unique().to_list()) == [0, 123456789]


def test_index_scores_are_model_scores_and_recall_is_high(built):
    _, artifacts = built
    rec = Recommender.load(VersionStore(artifacts).current())
    user = rec.user_emb[0]
    ids, scores = rec.retriever.search(user, 20)
    np.testing.assert_allclose(scores, rec.item_emb[ids] @ user, rtol=1e-5)
    exact = ExactRetriever(rec.item_emb)
    assert recall_against_exact(rec.retriever, exact, rec.user_emb[:50], k=100) >= 0.95


def test_evaluate_reproduces_the_validation_metrics_of_the_build(built):
    _, artifacts = built
    result = recsys("evaluate", "--artifacts", artifacts)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no third-party warnings (torch.fx printed one every time)
    manifest = read_manifest(VersionStore(artifacts).current())
    expected = manifest["train"]["valid_metrics"]["hit_rate@10"]
    row = next(line for line in result.stdout.splitlines() if "hit_rate@10 " in line)
    assert f"{expected:.4f}" in row  # the version's column (popularity's is beside it)


def test_evaluate_on_a_held_out_file_scores_every_user_of_it(built, tmp_path):
    """`--test`: a file of held-out events is the test. Each user's held-out item here is
    the version's own first recommendation, so HitRate@10 is 1; a row of an unknown user
    and one of an unknown item are left out and counted."""
    _, artifacts = built
    recs = tmp_path / "recs.parquet"
    assert (
        recsys(
            "recommend", "--artifacts", artifacts, "--users", "all", "--k", "1", "--out", recs
        ).returncode
        == 0
    )
    held_out = pl.read_parquet(recs).select("user_id", "item_id").head(40)
    unknown = pl.DataFrame({"user_id": [123456789, 0], "item_id": [0, 987654321]})
    test = tmp_path / "test.csv"
    pl.concat([held_out, unknown.cast(held_out.schema)]).write_csv(test)
    result = recsys("evaluate", "--artifacts", artifacts, "--test", test)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "evaluation on 40 users: 40 held-out events of test.csv (2 of users or items" in text
    row = next(line for line in result.stdout.splitlines() if "hit_rate@10 " in line)
    assert row.split("│")[2].strip() == "1.0000", row  # the version's column
    both = recsys("evaluate", "--artifacts", artifacts, "--test", test, "--data", test)
    assert both.returncode == 2 and "not both" in both.stderr
    strangers = tmp_path / "strangers.csv"
    unknown.write_csv(strangers)
    none = recsys("evaluate", "--artifacts", artifacts, "--test", strangers)
    assert none.returncode == 2 and "none of its 2 target events" in none.stderr, none.stderr


def test_rebuild_keeps_ids_and_records_the_previous_version(built, tmp_path):
    data, artifacts = built
    store = VersionStore(artifacts)
    first = store.current_name()
    old_vocab = pl.read_parquet(store.current() / "data/vocab/item_id.parquet")
    result = recsys(
        "build",
        "--data",
        data,
        "--artifacts",
        artifacts,
        "--epochs",
        "1",
        "--no-progress",
        "--no-gate",
    )
    assert result.returncode == 0, result.stderr
    assert store.current_name() != first and first in store.list()
    manifest = read_manifest(store.current())
    assert manifest["previous_version"] == first
    new_vocab = pl.read_parquet(store.current() / "data/vocab/item_id.parquet")
    assert new_vocab.head(old_vocab.height).equals(old_vocab)


def test_build_with_bad_data_fails_cleanly_and_keeps_nothing(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\n1,2\n")
    result = recsys("build", "--data", bad, "--artifacts", tmp_path / "art", "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "column 'user_id'" in result.stderr
    assert not VersionStore(tmp_path / "art").list()
    assert os.listdir(tmp_path / "art" / "versions") == []
