"""Recommendation quality on logs without timestamps (the protocol of the published
collaborative-filtering tables): each user's items split at random 80/20, the 80% given
to `recsys build` with no timestamp and sorted by user then item (as a dump without time
usually arrives), the 20% to test. Recall@20 and NDCG@20 over all items, training items
excluded. The two-tower model is a default build scored exactly from its stored
embeddings; each peer picks its settings on a validation holdout of the training items,
is refitted on all of them, then tested. Run on MovieLens-100K, on a synthetic log of
planted taste clusters (at least 1M events in the full run) and on a sparse synthetic
check-in log (`data.checkins`).
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from bench.report import markdown_table, save
from bench.tuning_grid import best_on_validation
from features.feature_set import FeatureSet
from features.history import UserHistories
from features.sources import resolve_source
from features.splits import random_holdout
from recsys.core import schema as s
from training.baselines import Ease, ItemKnn, MatrixFactorization, Popularity
from training.evaluate import EvalTask, Scorer, eval_task, evaluate

TEST_SHARE = 0.2
Side = tuple[pl.DataFrame, UserHistories, EvalTask]  # fit events, query histories, task


def holdout_files(events: pl.DataFrame, out: Path, seed: int = 0) -> tuple[Path, pl.DataFrame]:
    """Write the training 80% (no timestamp, sorted by user then item) and the test 20%
    (`recsys evaluate --test` scores a build on it, as this benchmark does); return the
    test pairs."""
    # Sorted before the draw: `unique()` returns rows in no fixed order, which made the
    # split (and every figure) differ from run to run.
    pairs = events.select(s.USER_ID, s.ITEM_ID).unique().sort(s.USER_ID, s.ITEM_ID)
    rng = np.random.default_rng(seed)
    pairs = pairs.with_columns(pl.Series("_key", rng.random(pairs.height)))
    pairs = pairs.with_columns(
        pl.col("_key").rank("ordinal").over(s.USER_ID).alias("_rank"),
        pl.len().over(s.USER_ID).alias("_n"),
    )
    is_test = (pl.col("_n") >= 2) & (
        pl.col("_rank") <= (pl.col("_n") * TEST_SHARE).round().clip(1, pl.col("_n") - 1)
    )
    out.mkdir(parents=True, exist_ok=True)
    train_path = out / "train.parquet"
    pairs.filter(~is_test).select(s.USER_ID, s.ITEM_ID).sort(s.USER_ID, s.ITEM_ID).write_parquet(
        train_path
    )
    test = pairs.filter(is_test).select(s.USER_ID, s.ITEM_ID)
    test.write_parquet(out / "test.parquet")
    return train_path, test


class EmbeddingScorer:
    """A built version's stored user and item embeddings, scored exactly."""

    def __init__(self, version: Path) -> None:
        users = pl.read_parquet(version / "embeddings" / "users.parquet")
        items = pl.read_parquet(version / "embeddings" / "items.parquet")
        self.user_emb = np.asarray(users["embedding"].to_numpy(), dtype=np.float32)  # (U, D)
        self.item_emb = np.asarray(items["embedding"].to_numpy(), dtype=np.float32)  # (I, D)

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.user_emb[users] @ self.item_emb.T


def _indexed(test: pl.DataFrame, data: Path) -> pl.DataFrame:
    """Test pairs in the build's dense indices (pairs of users or items the training part
    never had are left out, for every model alike)."""
    for column, index in ((s.USER_ID, s.USER_IDX), (s.ITEM_ID, s.ITEM_IDX)):
        vocab = pl.read_parquet(data / "vocab" / f"{column}.parquet")
        vocab = vocab.rename({"id": column, "index": index})
        test = test.join(vocab.with_columns(pl.col(column).cast(test[column].dtype)), on=column)
    return test.select(s.USER_IDX, s.ITEM_IDX)


def _tune(
    name: str,
    grid: list[dict[str, Any]],
    fit: Callable[..., Scorer],
    inner: Side,
    full: Side,
) -> dict[str, Any]:
    """Pick the grid point with the best validation Recall@20, refit on all training."""
    return best_on_validation(
        name,
        grid,
        lambda params: fit(inner[0], inner[1], **params),
        lambda params: fit(full[0], full[1], **params),
        inner[2],
        full[2],
        "recall@20",
    )


def peers(features: FeatureSet, test: EvalTask, quick: bool) -> list[dict[str, Any]]:
    """Popularity, EASE, item-kNN, ALS and BPR over small grids. On a large catalogue the
    grids shrink to the values chosen on MovieLens and the 200k-event log (EASE solves an
    items x items system per grid point), so the full run stays within its hour. EASE runs
    wherever its matrix fits in memory, and the table says why where it does not."""
    large = features.num_items > 5_000
    users, items = features.num_users, features.num_items
    inner = random_holdout(features.interactions, TEST_SHARE, seed=1)
    inner_known = features.restricted_to(inner.train)
    inner_task = eval_task(inner.valid, inner_known.histories)
    sides = (
        (inner.train, inner_known.histories, inner_task),
        (features.interactions, features.histories, test),
    )
    results = [_tune("popularity", [{}], lambda e, h: Popularity.fit(e, items), *sides)]
    too_large = Ease.fits(items)
    if too_large is None:
        l2s = (
            (100.0, 500.0)
            if quick
            else (200.0, 1000.0)
            if items > 20_000  # each fit is minutes there (40,000 items: about 5)
            else (200.0, 500.0, 1000.0)
            if large
            else (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
        )
        results.append(
            _tune(
                "EASE",
                [{"l2": v} for v in l2s],
                lambda e, h, l2: Ease.fit(e, h, users, items, l2),
                *sides,
            )
        )
    else:
        results.append({"model": "EASE", "skipped": too_large, "params": {}, "seconds": 0.0})
    knn = (50, 200) if quick or large else (20, 50, 100, 200, 500)
    results.append(
        _tune(
            "item-kNN",
            [{"neighbours": k} for k in knn],
            lambda e, h, neighbours: ItemKnn.fit(e, h, users, items, neighbours),
            *sides,
        )
    )
    als_grid = [
        {"factors": f, "regularization": r, "iterations": 15, "alpha": a}
        for f in ((64,) if quick or large else (64, 128))
        for r in ((0.1,) if quick else (0.01, 0.1, 1.0))
        for a in ((1.0,) if quick else (1.0, 10.0))
    ]
    results.append(
        _tune(
            "ALS (implicit)",
            als_grid,
            lambda e, h, **p: MatrixFactorization.als(e, users, items, **p),
            *sides,
        )
    )
    bpr_grid = [
        {"factors": 64, "learning_rate": lr, "regularization": 0.01, "iterations": it}
        for lr in ((0.01,) if quick else (0.01, 0.05))
        for it in ((100,) if quick or large else (100, 300))
    ]
    results.append(
        _tune(
            "BPR (implicit)",
            bpr_grid,
            lambda e, h, **p: MatrixFactorization.bpr(e, users, items, **p),
            *sides,
        )
    )
    return results


def two_tower(
    train_path: Path, work: Path, name: str = "default", changes: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Path]:
    """A `recsys build` of the training file, as a user would run it: the defaults, or the
    defaults with `changes` ({section: {setting: value}}) for an ablation."""
    import shutil

    from recsys.build_config import BuildConfig
    from recsys.pipeline import build

    settings = BuildConfig().with_overrides(
        {**(changes or {}), "rebuild": {"gate": False, "from_scratch": True}}
    )
    shutil.rmtree(work / "artifacts", ignore_errors=True)
    started = time.perf_counter()
    report = build(
        resolve_source(train_path),
        work / "artifacts",
        settings.tower,
        settings.train,
        progress=False,
        policy=settings.rebuild,
    )
    seconds = time.perf_counter() - started
    params = {
        "members": report.train.spec.members,
        "epochs": report.train.epochs_run,
        "best_epoch": report.train.best_epoch,
        "ordering": report.ingest.ordering,
    }
    model = "two-tower, " + ("default build" if not changes else name)
    return {"model": model, "params": params, "seconds": seconds}, report.path


# Each default, switched back one at a time (measured on MovieLens-100K in the full run):
# what each choice of issue 13 is worth. The ensemble first; the skip path on one tower,
# against the one-tower row. The popularity correction, the temperature, dropout and the
# refit were measured here until 2026-12-03 (docs/quality.md) and left the list to keep
# the full run within its hour.
ONE_TOWER = {"members": 1}
ABLATIONS: dict[str, dict[str, Any]] = {
    "one tower (no ensemble; 256-d)": {"tower": ONE_TOWER},
    "one tower, MLP alone, no skip path (was the default)": {"tower": {**ONE_TOWER, "skip": False}},
}


def protocol(
    name: str, events: pl.DataFrame, work: Path, quick: bool, ablations: bool = False
) -> list[dict[str, Any]]:
    train_path, test_pairs = holdout_files(events, work)
    ours, version = two_tower(train_path, work)
    features = FeatureSet.load(version / "data")
    test = eval_task(_indexed(test_pairs, version / "data"), features.histories)
    ours.update(evaluate(EmbeddingScorer(version), test))
    variants = []
    for label, changes in (ABLATIONS if ablations else {}).items():
        variant, path = two_tower(train_path, work / "ablation", label, changes)
        variants.append({**variant, **evaluate(EmbeddingScorer(path), test)})
    results = [ours, *peers(features, test, quick)]
    best = max((r for r in results[1:] if "skipped" not in r), key=lambda r: r["recall@20"])
    results += variants
    headers = ["model", "Recall@20", "NDCG@20", "Recall@50", "seconds", "chosen"]
    rows = [
        [r["model"], "-", "-", "-", "-", f"not run: {r['skipped']}"]
        if "skipped" in r
        else [
            r["model"],
            f"{r['recall@20']:.4f}",
            f"{r['ndcg@20']:.4f}",
            f"{r['recall@50']:.4f}",
            f"{r['seconds']:.1f}",
            str(r["params"]),
        ]
        for r in results
    ]
    notes = (
        f"{name}: {features.interactions.height:,} training events of {features.num_users:,} "
        f"users and {features.num_items:,} items, {len(test):,} test users. Two-tower / best "
        f"peer ({best['model']}): Recall@20 x{ours['recall@20'] / best['recall@20']:.2f}."
    )
    slug = name.lower().replace(" ", "-").replace(",", "")
    save(
        f"quality-sets-{slug}",
        f"Quality without timestamps: {name}",
        markdown_table(headers, rows),
        notes,
    )
    return results


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    from data import checkins, movielens, synthetic
    from recsys.core.settings import Settings

    ml = pl.read_parquet(movielens.fetch(Settings().datasets_dir) / "interactions.parquet")
    results = protocol("MovieLens-100K", ml, work / "sets-ml-100k", quick)
    rows = 200_000 if quick else 1_000_000
    synth_dir = synthetic.generate(
        work / f"synth-sets-{rows}", synthetic.SyntheticConfig(rows=rows, seed=7)
    )
    synth = pl.read_parquet([str(p) for p in resolve_source(synth_dir).interactions])
    results += protocol(f"synthetic {rows:,} events", synth, work / f"sets-synth-{rows}", quick)
    # Sparse and local, shaped like public check-in benchmarks: where item-item peers are
    # strongest and a two-tower model weakest.
    rows = 50_000 if quick else 100_000
    sparse_dir = checkins.generate(
        work / f"checkins-{rows}", checkins.CheckinConfig(rows=rows, seed=7)
    )
    sparse = pl.read_parquet(sparse_dir / "interactions.parquet")
    results += protocol(f"check-ins {rows:,} events", sparse, work / f"sets-checkins-{rows}", quick)
    return results


def run_ablations(quick: bool, work: Path) -> list[dict[str, Any]]:
    """MovieLens-100K's protocol with each of `ABLATIONS` beside the default build: part
    of the opt-in `ablations` section, which keeps the full run within its hour."""
    from data import movielens
    from recsys.core.settings import Settings

    ml = pl.read_parquet(movielens.fetch(Settings().datasets_dir) / "interactions.parquet")
    return protocol("MovieLens-100K", ml, work / "sets-ml-100k", quick, ablations=True)


def parse_changes(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """["train.temperature=0.1", 'train.losses=["npair"]'] -> {"train": {...}} (TOML values)."""
    import tomllib

    changes: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        section, _, name = key.partition(".")
        changes.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
    return changes


def main() -> None:
    """One build of the protocol with changed settings, for exploring before a default
    changes: `python -m bench.quality_sets [--synthetic ROWS] train.temperature=0.2`."""
    import argparse
    import logging
    import warnings

    from data import checkins, movielens, synthetic
    from recsys.core.settings import Settings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("changes", nargs="*", help="SECTION.KEY=VALUE (TOML value)")
    parser.add_argument("--synthetic", type=int, help="a planted log of this many events")
    parser.add_argument("--checkins", type=int, help="a sparse check-in log of this many events")
    parser.add_argument(
        "--popularity-spread",
        type=float,
        default=checkins.CheckinConfig.popularity_spread,
        help="the check-in log's popularity spread (log-normal sigma; higher: more skewed)",
    )
    parser.add_argument("--peers", action="store_true", help="also fit and score the peers")
    parser.add_argument("--work", type=Path, default=Settings().cache_dir / "bench" / "explore")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.checkins:
        shape = checkins.CheckinConfig(
            args.checkins, popularity_spread=args.popularity_spread, seed=7
        )
        name = f"checkins-{args.checkins}"  # the usual log keeps its directory
        if shape.popularity_spread != checkins.CheckinConfig.popularity_spread:
            name += f"-spread-{shape.popularity_spread}"
        data = checkins.generate(args.work / name, shape)
        events = pl.read_parquet(data / "interactions.parquet")
    elif args.synthetic:
        config = synthetic.SyntheticConfig(rows=args.synthetic, seed=7)
        data = synthetic.generate(args.work / f"synth-{args.synthetic}", config)
        events = pl.read_parquet([str(p) for p in resolve_source(data).interactions])
    else:
        events = pl.read_parquet(movielens.fetch(Settings().datasets_dir) / "interactions.parquet")
    train_path, test_pairs = holdout_files(events, args.work / "split")
    changes = parse_changes(args.changes)
    result, version = two_tower(train_path, args.work, " ".join(args.changes), changes)
    features = FeatureSet.load(version / "data")
    test = eval_task(_indexed(test_pairs, version / "data"), features.histories)
    metrics = evaluate(EmbeddingScorer(version), test)
    print(
        f"{' '.join(args.changes) or 'defaults'}: Recall@20 {metrics['recall@20']:.4f} "
        f"NDCG@20 {metrics['ndcg@20']:.4f} {result['params']} {result['seconds']:.0f}s"
    )
    for peer in peers(features, test, quick=False) if args.peers else []:
        if "skipped" in peer:
            print(f"{peer['model']}: not run ({peer['skipped']})")
            continue
        print(
            f"{peer['model']}: Recall@20 {peer['recall@20']:.4f} NDCG@20 {peer['ndcg@20']:.4f}"
            f" {peer['params']} {peer['seconds']:.0f}s"
        )


if __name__ == "__main__":
    main()
