"""`recsys export`: a version's embeddings out as Parquet or npy, IDs in the log's type,
row for row what the service searches, through the command a user runs."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import recsys, small_version
from test_event_weights import shop_log

from data.synthetic import SyntheticConfig
from features.sources import resolve_source
from recsys.core.versions import VersionStore
from recsys.export import served_similarity
from recsys.pipeline import build
from serving.recommender import Recommender
from training.config import TowerConfig, TrainConfig

pytestmark = pytest.mark.slow  # builds models: `make test` only


@pytest.fixture(scope="module")
def integer_ids(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("export"),
        SyntheticConfig(rows=4_000, users=80, items=60, clusters=3, seed=2),
        TrainConfig(max_epochs=1),
    )


@pytest.fixture(scope="module")
def text_ids(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-text")
    artifacts = root / "artifacts"
    source = resolve_source(shop_log(root / "shop"))
    build(source, artifacts, TowerConfig(members=1), TrainConfig(max_epochs=1), progress=False)
    return artifacts


def _served(artifacts: Path) -> Recommender:
    return Recommender.load(VersionStore(artifacts).current())


@pytest.mark.parametrize("side", ["users", "items"])
def test_parquet_holds_every_id_in_the_logs_type_with_its_served_vector(
    integer_ids, tmp_path, side
):
    out = tmp_path / f"{side}.parquet"
    done = recsys("export", "--artifacts", integer_ids, "--what", side, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "search by" in done.stdout
    rec = _served(integer_ids)
    ids, vectors = (rec.user_ids, rec.user_emb) if side == "users" else (rec.item_ids, rec.item_emb)
    frame = pl.read_parquet(out)
    column = "user_id" if side == "users" else "item_id"
    assert frame.columns == [column, "embedding"]
    assert frame[column].dtype == pl.Int64 and frame[column].to_list() == ids.to_list()
    assert np.array_equal(np.stack(frame["embedding"].to_numpy()), vectors)


def test_npy_is_the_matrix_and_its_ids_beside_it_loadable_without_pickle(text_ids, tmp_path):
    out = tmp_path / "deep" / "items.npy"
    done = recsys(
        "export", "--artifacts", text_ids, "--what", "items", "--format", "npy", "--out", out
    )
    assert done.returncode == 0, done.stderr
    rec = _served(text_ids)
    vectors = np.load(out, allow_pickle=False)
    ids = np.load(tmp_path / "deep" / "items.ids.npy", allow_pickle=False)
    assert vectors.dtype == np.float32 and np.array_equal(vectors, rec.item_emb)
    assert ids.dtype.kind == "U" and ids.tolist() == rec.item_ids.to_list()


def test_bad_requests_are_refused_in_one_line(integer_ids, tmp_path):
    bad_side = recsys("export", "--artifacts", integer_ids, "--what", "things", "--out", "x")
    assert bad_side.returncode == 2 and "things" in bad_side.stderr
    onto_dir = recsys("export", "--artifacts", integer_ids, "--what", "items", "--out", tmp_path)
    assert onto_dir.returncode == 2 and "is a directory" in onto_dir.stderr
    nothing = recsys("export", "--artifacts", tmp_path / "none", "--what", "items", "--out", "y")
    assert nothing.returncode == 2 and "Traceback" not in nothing.stderr


def test_the_similarity_named_is_the_index_metric():
    """A spectral branch makes a cosine version's index search by inner product: the
    export names what the service ranks by, not the towers' similarity."""
    cosine_towers = {"similarity": "cosine", "index": {"metric": "dot"}}
    assert served_similarity(cosine_towers) == "dot"
    assert served_similarity({"similarity": "cosine", "index": {"metric": "angular"}}) == "cosine"
    assert served_similarity({"similarity": "dot", "index": {"metric": "dot"}}) == "dot"


@pytest.fixture(scope="module")
def branched(tmp_path_factory) -> Path:
    """A sparse log of 25 planted groups of 40 items, 2 to 6 events per user: the spectral
    branch gains on it, so the version keeps it (and its index searches by dot product)."""
    root = tmp_path_factory.mktemp("export-branched")
    rng = np.random.default_rng(1)
    popularity = 1 / np.arange(1, 501) ** 0.8
    rows = []
    for user in range(600):
        group = (np.arange(40) + rng.integers(0, 25) * 20) % 500
        share = popularity[group] / popularity[group].sum()
        items = rng.choice(group, size=rng.integers(2, 7), replace=False, p=share)
        rows += [(user, int(i), 1_700_000_000 + int(rng.integers(0, 10**6))) for i in items]
    log = root / "log.csv"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(log)
    build(
        resolve_source(log),
        root / "artifacts",
        TowerConfig(members=1),
        TrainConfig(max_epochs=2),
        progress=False,
    )
    return root / "artifacts"


def test_a_branched_cosine_version_is_exported_for_dot_product_search(branched, tmp_path):
    """It printed "search by cosine"; searched so, its lists matched the served ones 0.83."""
    manifest = json.loads((VersionStore(branched).current() / "manifest.json").read_text())
    assert manifest["spectral"]["used"], manifest["spectral"]["reason"]
    assert manifest["similarity"] == "cosine" and manifest["index"]["metric"] == "dot"
    out = tmp_path / "items.npy"
    done = recsys(
        "export", "--artifacts", branched, "--what", "items", "--format", "npy", "--out", out
    )
    assert done.returncode == 0, done.stderr
    assert "(search by dot)" in done.stdout
    rec, exported = _served(branched), np.load(out)
    lists = rec.for_users(np.arange(20), 10)
    users, items = lists["user_idx"].to_numpy(), lists["item_idx"].to_numpy()
    dots = (rec.user_emb[users] * exported[items]).sum(axis=1)
    assert np.allclose(lists["score"].to_numpy(), dots, atol=1e-4)  # served by dot product
    norms = np.linalg.norm(exported, axis=1)
    assert norms.max() > 1.05 * norms.min()  # so a cosine search would rank differently
