"""No non-finite number reaches a served model (issue 34, probe 2): two events weighing
1e308 made a build's weights NaN and a NaN model was promoted, every answer `"score":
null`. Ingest refuses such weights, the gate counts a NaN as worse, and a version with a
non-finite number is never committed, whatever the gate says."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import private_copy, small_version

from data.synthetic import SyntheticConfig
from recsys.core.errors import RecsysError
from recsys.core.layout import VersionLayout
from recsys.core.versions import VersionStore
from recsys.gate import compare
from training.config import TrainConfig


def test_a_nan_metric_is_worse_not_promoted():
    reference = np.full(50, 0.3)
    assert compare("v", np.full(50, np.nan), reference, 0.0, 0).worse
    assert compare("v", reference.copy(), np.full(50, np.nan), 0.0, 0).worse
    assert not compare("v", reference.copy(), reference, 0.0, 0).worse


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("non_finite"),
        SyntheticConfig(rows=6_000, users=150, items=100, clusters=4, seed=4),
        TrainConfig(max_epochs=1),
    )


@pytest.mark.slow
def test_a_version_with_nan_embeddings_is_refused_at_commit(built):
    from recsys.pipeline import Embeddings, refuse_non_finite

    layout = VersionLayout(VersionStore(built).current())
    users = pl.read_parquet(layout.side_embeddings("users"))
    items = pl.read_parquet(layout.side_embeddings("items"))
    user_emb = np.stack(users["embedding"].to_list()).astype(np.float32)
    item_emb = np.stack(items["embedding"].to_list()).astype(np.float32)
    refuse_non_finite(layout, Embeddings(user_emb, item_emb), {"recall@20": 0.1})  # fine
    user_emb[3, 1] = np.nan
    with pytest.raises(RecsysError, match="not finite: 1 values of the user embeddings"):
        refuse_non_finite(layout, Embeddings(user_emb, item_emb), {"recall@20": 0.1})
    with pytest.raises(RecsysError, match="validation recall@20 = nan"):
        refuse_non_finite(layout, Embeddings(item_emb, item_emb), {"recall@20": float("nan")})


@pytest.mark.slow
def test_events_weighing_1e308_never_make_a_nan_version(built, tmp_path):
    """The events an older service accepted, absorbed by the next build: quarantined by
    the segments' reader (as the route refuses them), the version finite and promoted."""
    from test_events import _rebuild

    from features.event_log import QUARANTINED

    artifacts = private_copy(built, tmp_path)
    segment = artifacts / "events" / "20260101T000000-old-1-cafebabe.csv"
    segment.parent.mkdir(parents=True, exist_ok=True)
    segment.write_text(
        "user_id,item_id,timestamp,weight,event\n"
        "1,2,1700000000,1e+308,\n"
        "1,3,1700000000,1e+308,\n"
        "2,3,1700000000,1.0,\n"
    )
    before = QUARANTINED["lines"]
    report = _rebuild(artifacts, built.parent / "data")
    assert QUARANTINED["lines"] - before == 2
    store = VersionStore(artifacts)
    assert store.current_name() == report.version
    layout = VersionLayout(store.current())
    for side in ("users", "items"):
        embedding = pl.read_parquet(layout.side_embeddings(side))["embedding"]
        assert np.isfinite(np.stack(embedding.to_list())).all(), f"{side}: not finite"
