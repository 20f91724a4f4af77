"""The spectral branch (`training.spectral`): what a request computes is what the build
stored, a build on a sparse log keeps it where validation gains and says so, every path
that makes a vector (known users, fresh histories, new items, the index) gives the joined
width, and `train.spectral = false` leaves a version as it was."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from data import checkins
from features.feature_set import FeatureSet
from features.ordering import Ordering
from features.sources import resolve_source
from recsys.core.layout import VersionLayout
from recsys.pipeline import build
from serving.index_params import PARAMS_FILE, IndexParams
from serving.item_tower import ItemTower
from serving.user_tower import UserTower
from training import spectral
from training.config import TrainConfig
from training.embed import BranchedScorer, TowerScorer
from training.export import version_towers

QUICK = TrainConfig(max_epochs=1)


def _planted(users: int = 300, items: int = 120, groups: int = 4, seed: int = 0) -> sp.csr_matrix:
    """Users who mostly pick items of their own group: structure a low rank finds."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for user in range(users):
        group = user % groups
        own = np.arange(group, items, groups)
        picks = [*rng.choice(own, 6, replace=False).tolist(), int(rng.integers(items))]
        rows += [user] * len(picks)
        cols += picks
    return spectral.interaction_matrix(
        pl.DataFrame({"user_idx": rows, "item_idx": cols}), users, items
    )


def test_a_request_history_gets_the_part_the_build_stored_for_that_user() -> None:
    matrix = _planted()
    branch = spectral.weighted(spectral.fit(matrix, 8), 1.7)
    stored = branch.users(matrix)
    for user in (0, 5, 299):
        history = matrix[user].indices.tolist()
        repeated = history + history[:2] + [10_000]  # repeats once, an unknown item never
        assert np.allclose(branch.user(repeated), stored[user], atol=1e-6)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    assert np.allclose(branch.user([]), 0.0)


def test_the_output_exponent_moves_only_the_item_rows_by_their_degree() -> None:
    matrix = _planted()
    basis = spectral.decompose(matrix, 8)
    light, heavy = basis.branch(8, 0.3), basis.branch(8, 0.5)
    assert np.array_equal(light.history_rows, heavy.history_rows)  # users' parts stay
    degree = np.asarray(matrix.sum(axis=0)).ravel()
    seen = degree > 0
    ratio = heavy.item_rows[seen] / np.where(light.item_rows[seen] == 0, 1, light.item_rows[seen])
    nonzero = light.item_rows[seen] != 0
    assert np.allclose(
        ratio[nonzero], np.broadcast_to(degree[seen, None] ** 0.2, ratio.shape)[nonzero], rtol=1e-4
    )
    assert basis.branch(4).rank == 4 and basis.branch(50).rank == 8  # clipped to the basis
    assert np.allclose(spectral.fit(matrix, 8, output=0.3).item_rows, light.item_rows)


def test_the_decomposition_finds_the_top_singular_vectors_even_of_a_degenerate_block() -> None:
    matrix = _planted()
    exact = np.linalg.svd(matrix.toarray(), full_matrices=False)[2][:4].T
    found = spectral.top_right_singular_vectors(matrix, 4)
    # the same subspace: each found vector lies in the span of the exact ones
    assert np.allclose(np.linalg.norm(exact.T @ found, axis=0), 1.0, atol=1e-3)
    # a block with repeated columns has a singular Gram matrix: Householder takes over
    block = np.repeat(np.random.default_rng(0).standard_normal((50, 3)), 2, axis=1)
    basis = spectral._orthonormal(block.astype(np.float32))
    assert np.all(np.isfinite(basis))
    assert np.allclose(basis @ (basis.T @ block), block, atol=1e-4)  # spans the block


def test_a_refit_begun_from_the_validation_basis_is_as_accurate_as_that_basis() -> None:
    """A rank's trailing vectors are the least accurate of a decomposition at that rank:
    the build validates a rank cut from a wider basis, so the refit on every event must
    be as wide, and one power iteration from the validation basis makes it so."""
    rng = np.random.default_rng(3)
    dense = (rng.random((900, 700)) < 0.02).astype(np.float32)  # a flat spectrum: no gap
    everything = sp.csr_matrix(dense)
    part = sp.csr_matrix(dense * (rng.random(dense.shape) < 0.8))
    exact = np.linalg.svd(spectral.normalised(everything)[0].toarray())[2]

    def error(basis: spectral.Basis, rank: int) -> float:
        """How far the basis's top `rank` vectors stray from the exact subspace."""
        top = exact[:rank].T
        found = basis.vectors[:, :rank]
        return float(np.linalg.norm(found - top @ (top.T @ found)))

    start = spectral.decompose(part, 256)
    refit = spectral.decompose(everything, 256, start=start)
    assert refit.rank == 256
    cold = spectral.decompose(everything, 128)
    assert error(refit, 128) < 0.5 * error(cold, 128)
    with pytest.raises(ValueError, match="700 items"):
        spectral.decompose(everything[:, :600], 64, start=start)


def test_weights_count_as_the_build_counts_them_largest_per_item_and_zero_for_nothing() -> None:
    rng = np.random.default_rng(1)
    events = pl.DataFrame(
        {
            "user_idx": rng.integers(0, 60, 900),
            "item_idx": rng.integers(0, 40, 900),
            "weight": rng.choice([0.0, 0.1, 1.0], 900).astype(np.float32),
        }
    )
    matrix = spectral.interaction_matrix(events, 60, 40)
    assert matrix.max() == 1.0 and matrix.min() == 0.0 and np.all(matrix.data > 0)
    assert np.allclose(matrix.max(axis=1).toarray()[np.diff(matrix.indptr) > 0], 1.0)
    branch = spectral.fit(matrix, 6)
    stored = branch.users(matrix)
    for user in (0, 7, 59):
        mine = events.filter(pl.col("user_idx") == user)
        served = branch.user(mine["item_idx"].to_list(), mine["weight"].to_list())
        assert np.allclose(served, stored[user], atol=1e-5)


def test_a_user_whose_weights_are_all_larger_weighs_as_much_as_one_whose_are_not() -> None:
    """Two posted events at 10x every other weight made one user a component of the
    decomposition: their two items became every item's nearest neighbours."""
    rng = np.random.default_rng(2)
    events = pl.DataFrame(
        {
            "user_idx": rng.integers(0, 80, 1_200),
            "item_idx": rng.integers(0, 50, 1_200),
            "weight": rng.choice([0.5, 1.0], 1_200).astype(np.float32),
        }
    )
    heavy = events.with_columns(
        pl.when(pl.col("user_idx") == 3).then(pl.col("weight") * 10).otherwise(pl.col("weight"))
    )
    plain = spectral.fit(spectral.interaction_matrix(events, 80, 50), 8)
    scaled = spectral.fit(spectral.interaction_matrix(heavy, 80, 50), 8)
    assert np.allclose(np.abs(plain.item_rows), np.abs(scaled.item_rows), atol=1e-4)


def test_the_filter_ranks_a_users_own_group_first() -> None:
    matrix = _planted()
    branch = spectral.fit(matrix, 4)
    scores = branch.users(matrix) @ branch.item_rows.T  # (users, items)
    top = np.argsort(-scores, axis=1)[:, :10]
    assert np.mean(top % 4 == (np.arange(matrix.shape[0]) % 4)[:, None]) > 0.9


def test_the_ranks_tried_stay_below_half_the_smaller_side_and_within_the_work_budget() -> None:
    assert spectral.candidate_ranks(943, 1_682) == (8, 16, 32, 48, 64, 96, 128, 192, 256, 384)
    assert spectral.candidate_ranks(30_000, 36_706)[-1] == 1_024
    assert spectral.candidate_ranks(200_000, 150_000)[-1] == 384  # 350,000 x 512^2 > budget
    assert spectral.candidate_ranks(10, 10) == ()


def test_a_branch_round_trips_through_its_file(tmp_path: Path) -> None:
    branch = spectral.fit(_planted(), 8)
    branch.save(tmp_path / "spectral.safetensors")
    loaded = spectral.Spectral.load(tmp_path / "spectral.safetensors")
    assert loaded is not None and loaded.rank == 8
    assert np.array_equal(loaded.item_rows, branch.item_rows)
    assert spectral.stored_rank(tmp_path / "spectral.safetensors") == 8
    assert spectral.Spectral.load(tmp_path / "none") is None
    assert spectral.stored_rank(tmp_path / "none") == 0


@pytest.fixture(scope="module")
def sparse_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sparse")
    return checkins.generate(root / "log", checkins.CheckinConfig(rows=40_000, seed=3))


def _version(artifacts: Path) -> Path:
    return (artifacts / "current").resolve()


@pytest.mark.slow  # two builds
def test_a_sparse_build_keeps_the_branch_and_every_vector_path_gives_its_width(
    sparse_log: Path, tmp_path: Path
) -> None:
    build(resolve_source(sparse_log), tmp_path / "on", config=QUICK, progress=False)
    version = _version(tmp_path / "on")
    layout = VersionLayout(version)
    chosen = json.loads((version / "manifest.json").read_text())["spectral"]
    assert chosen["used"], chosen["reason"]
    assert (
        max(v for k, v in chosen["valid"].items() if k.startswith("towers +"))
        >= 1.01 * (chosen["valid"]["towers"])
    )
    rank = chosen["rank"]
    # cut from a basis as wide as the one validation chose it from: the largest rank tried
    tried = [int(k.split()[2]) for k in chosen["valid"] if k.startswith("filter rank ")]
    assert chosen["basis_rank"] == max(tried) >= rank
    assert chosen["output_exponent"] in spectral.OUTPUT_EXPONENTS
    assert chosen["normalisation"] in spectral.NORMALISATIONS
    assert str(chosen["output_exponent"]) in chosen["reason"]
    assert spectral.stored_rank(layout.spectral) == rank
    users = pl.read_parquet(layout.side_embeddings("users"))
    items = pl.read_parquet(layout.side_embeddings("items"))
    user_emb = np.asarray(users["embedding"].to_list(), np.float32)
    item_emb = np.asarray(items["embedding"].to_list(), np.float32)
    assert user_emb.shape[1] == item_emb.shape[1]
    params = json.loads((layout.index / PARAMS_FILE).read_text())
    assert IndexParams(**params).metric == "dot"  # the branch's rows differ in length
    # The service's tower gives a known user, from their history, the stored vector.
    tower = UserTower.load(version, Ordering.SET)
    histories = pl.read_parquet(layout.interactions).group_by("user_idx").agg("item_idx")
    for user, history in histories.sort("user_idx").head(5).iter_rows():
        served = tower.embed(user, sorted(history))
        assert served.shape == (user_emb.shape[1],)
        assert np.allclose(served[-rank:], user_emb[user, -rank:], atol=1e-5)
    # `recsys evaluate` on events the version never saw scores what the index serves.
    features = FeatureSet.load(layout.data)
    model, builder = version_towers(version, features)
    branch = spectral.Spectral.load(layout.spectral)
    assert branch is not None
    scorer = BranchedScorer(TowerScorer(model, builder, features.num_items), branch, features)
    some = np.arange(0, features.num_users, 37)
    assert np.allclose(scorer.scores(some), user_emb[some] @ item_emb.T, atol=1e-4)
    # An item added from its features: the towers' vector, and zeros in the branch.
    new_item = ItemTower.load(version).embed({})
    assert new_item.shape == (item_emb.shape[1],)
    assert np.all(new_item[-rank:] == 0)


@pytest.mark.slow  # one build
def test_switched_off_a_build_is_the_towers_alone(sparse_log: Path, tmp_path: Path) -> None:
    config = TrainConfig(max_epochs=1, spectral=False)
    build(resolve_source(sparse_log), tmp_path / "off", config=config, progress=False)
    version = _version(tmp_path / "off")
    chosen = json.loads((version / "manifest.json").read_text())["spectral"]
    assert chosen == {**chosen, "used": False, "reason": "off: train.spectral = false"}
    assert not VersionLayout(version).spectral.exists()
    width = UserTower.load(version, Ordering.SET).embed(None, [0, 1]).shape[0]
    assert ItemTower.load(version).embed({}).shape[0] == width
