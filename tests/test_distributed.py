"""Training on two CPU ranks (gloo) under torchrun, through `recsys build --nproc 2`: the
embedding tables are really sharded, the model is as good as the one-rank model, and its
unsharded export serves from one process; a one-rank version warm-starts a sharded run."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import recsys

from data.synthetic import SyntheticConfig, generate
from recsys.core.artifacts import read_manifest
from recsys.core.versions import VersionStore
from serving.app import create_app
from serving.settings import ServiceSettings

pytestmark = pytest.mark.slow  # builds models or runs the service: `make test` only

RECALL_TOLERANCE = 0.05  # absolute, on validation recall@20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    cfg = SyntheticConfig(rows=20_000, users=400, items=200, clusters=4, taste=0.9, seed=5)
    generate(root / "data", cfg)
    return root / "data"


def build(data: Path, artifacts: Path, *options: str) -> dict:
    result = recsys("build", "--data", data, "--artifacts", artifacts, "--epochs", "3", *options)
    assert result.returncode == 0, result.stderr
    return read_manifest(VersionStore(artifacts).current())


def test_two_ranks_shard_the_tables_and_match_one_rank(data, tmp_path):
    one = build(data, tmp_path / "one", "--nproc", "1")
    two = build(data, tmp_path / "two", "--nproc", "2")
    assert one["train"]["ranks"] == 1 and two["train"]["ranks"] == 2
    sharding = two["train"]["sharding"]
    total = sum(sum(weights) for weights in sharding.values())
    held = [sum(weights[rank] for weights in sharding.values()) for rank in (0, 1)]
    assert all(0 < weights < total for weights in held), sharding  # each rank holds a part
    recall = [m["train"]["valid_metrics"]["recall@20"] for m in (one, two)]
    assert abs(recall[0] - recall[1]) <= RECALL_TOLERANCE, recall
    assert recall[1] > 0.3  # far above chance (20 of 200 items: 0.1)


def test_a_one_rank_version_warm_starts_a_column_wise_sharded_run_that_serves(data, tmp_path):
    artifacts = tmp_path / "artifacts"
    first = build(data, artifacts)["version"]
    rebuilt = build(data, artifacts, "--nproc", "2", "--sharding", "column_wise", "--no-gate")
    assert rebuilt["train"]["warm_start_from"] == first
    held = [sum(part[rank] for part in rebuilt["train"]["sharding"].values()) for rank in (0, 1)]
    assert min(held) > 0  # both ranks hold weights
    settings = ServiceSettings(artifacts=artifacts, redis_url=None, reload_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        answer = client.get("/v1/users/7/recommendations", params={"k": 5})
        assert answer.status_code == 200
        assert answer.json()["model_version"] == rebuilt["version"]
        assert len(answer.json()["items"]) == 5


def test_a_bad_device_is_refused_with_a_clear_message(data, tmp_path):
    result = recsys("build", "--data", data, "--artifacts", tmp_path / "a", "--device", "tpu")
    assert result.returncode == 2 and "device: Input should be 'cpu' or 'cuda'" in result.stderr


def test_row_wise_sharding_on_cpu_is_refused_clearly(data, tmp_path):
    result = recsys(
        "build",
        "--data",
        data,
        "--artifacts",
        tmp_path / "a",
        "--nproc",
        "2",
        "--sharding",
        "row_wise",
        "--epochs",
        "1",
    )
    assert result.returncode == 2 and "not available on cpu" in result.stderr


def test_user_shards_cover_every_user_once_with_balanced_events(tmp_path):
    from itertools import pairwise

    from features.feature_set import FeatureSet, user_shard
    from features.ingest import ingest
    from features.sources import resolve_source

    generate(tmp_path / "raw", SyntheticConfig(rows=6_000, users=300, items=50, seed=1))
    ingest(resolve_source(tmp_path / "raw"), tmp_path / "ingest")
    whole = FeatureSet.load(tmp_path / "ingest")
    ranges = [user_shard(tmp_path / "ingest", rank, 3) for rank in range(3)]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in pairwise(ranges))
    parts = [FeatureSet.load(tmp_path / "ingest", users=r).interactions.height for r in ranges]
    assert sum(parts) == whole.interactions.height
    assert max(parts) - min(parts) < 0.1 * whole.interactions.height


def test_configs_survive_the_trip_to_the_ranks_as_json():
    import json

    from training.config import LossKind, Similarity, TowerConfig, TrainConfig

    tower = TowerConfig(embedding_dim=32, similarity=Similarity.DOT)
    config = TrainConfig(losses=((LossKind.TRIPLET, 0.5),), warm_epochs=2, sharding="table_wise")
    assert TowerConfig.from_dict(json.loads(json.dumps(tower.to_dict()))) == tower
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
