"""Recommendation quality on MovieLens-100K, temporal leave-one-out, full ranking: the
two-tower model with default settings against popularity, EASE, ALS and BPR, all on the
same split and measured by the same code.

Protocol: each user's last event is the test item, the one before it validates. The
two-tower model early-stops on validation. Each peer picks its hyper-parameters from a
small grid on validation, is refitted on train + validation, then tested.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from bench.report import RESULTS_DIR, markdown_table, save
from bench.tuning_grid import best_on_validation
from features.feature_set import FeatureSet
from features.history import UserHistories
from features.ingest import ingest
from features.sources import resolve_source
from features.splits import ROW, leave_last_out
from training.baselines import Ease, MatrixFactorization, Popularity
from training.batches import BatchBuilder
from training.config import LossKind, Similarity, TowerConfig, TrainConfig
from training.embed import BranchedScorer, TowerScorer
from training.evaluate import KS, EvalTask, Scorer, eval_task, evaluate
from training.export import load_model, save_model
from training.spectral_choice import choose as choose_spectral
from training.trainer import train


def _tune(
    name: str,
    grid: list[dict[str, Any]],
    fit: Callable[..., Scorer],
    train_events: pl.DataFrame,
    all_events: pl.DataFrame,
    valid: EvalTask,
    test: EvalTask,
) -> dict[str, Any]:
    """Pick the grid point with the best validation HitRate@10, refit, test."""
    return best_on_validation(
        name,
        grid,
        lambda params: fit(train_events, **params),
        lambda params: fit(all_events, **params),
        valid,
        test,
        "hit_rate@10",
    )


def peers(
    features: FeatureSet, train_events, all_events, valid, test, quick: bool
) -> list[dict[str, Any]]:
    """Popularity, EASE, ALS and BPR, each tuned on `valid` and refitted on `all_events`.
    Every model scores a user from the events it was fitted on (its query histories)."""
    users, items = features.num_users, features.num_items

    def histories(events: pl.DataFrame) -> UserHistories:
        return UserHistories.from_interactions(events.sort(ROW), users)

    results = [
        _tune(
            "popularity",
            [{}],
            lambda e: Popularity.fit(e, items),
            train_events,
            all_events,
            valid,
            test,
        )
    ]
    if Ease.fits(items) is None:  # the items x items matrix fits in memory
        grid = [
            {"l2": v} for v in ((100.0, 500.0) if quick else (50.0, 100.0, 200.0, 500.0, 1000.0))
        ]
        results.append(
            _tune(
                "EASE",
                grid,
                lambda e, l2: Ease.fit(e, histories(e), users, items, l2),
                train_events,
                all_events,
                valid,
                test,
            )
        )
    als_grid = [
        {"factors": f, "regularization": r, "iterations": 15, "alpha": a}
        for f in (64,)
        for r in ((0.1,) if quick else (0.01, 0.1, 1.0))
        for a in ((1.0,) if quick else (1.0, 10.0))
    ]
    results.append(
        _tune(
            "ALS (implicit)",
            als_grid,
            lambda e, **p: MatrixFactorization.als(e, users, items, **p),
            train_events,
            all_events,
            valid,
            test,
        )
    )
    bpr_grid = [
        {"factors": 64, "learning_rate": lr, "regularization": 0.01, "iterations": it}
        for lr in ((0.01,) if quick else (0.01, 0.05))
        for it in ((100,) if quick else (100, 300))
    ]
    results.append(
        _tune(
            "BPR (implicit)",
            bpr_grid,
            lambda e, **p: MatrixFactorization.bpr(e, users, items, **p),
            train_events,
            all_events,
            valid,
            test,
        )
    )
    return results


def two_tower(
    features: FeatureSet,
    split,
    test: EvalTask,
    work: Path,
    loss: LossKind,
    members: int | None = None,
    changes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Default settings, only the loss (or the number of members) varies. N-pair runs on
    raw dot products, its own setting (Sohn 2016: unnormalised embeddings held back by an
    L2 penalty); on cosine similarities its logits stay within [-1, 1] and its softmax
    barely separates items."""
    similarity = Similarity.DOT if loss is LossKind.NPAIR else Similarity.COSINE
    changes = changes or {}
    tower = TowerConfig(
        **{"similarity": similarity, "members": members, **changes.get("tower", {})}
    )
    started = time.perf_counter()
    config = TrainConfig(**{"losses": ((loss, 1.0),), **changes.get("train", {})})
    result = train(features, split, tower, config, progress=False)
    seconds = time.perf_counter() - started
    out = work / f"two-tower-{loss.value}-{members or 'auto'}"
    save_model(result.state, result.spec, out)
    # Tested as of the end of training + validation: the validation event is history now.
    seen = features.restricted_to(pl.concat([split.train, split.valid]).sort(ROW))
    builder = BatchBuilder(seen, result.spec.tower)
    builder.mark_known(split.train)  # IDs known from training alone
    scorer: Scorer = TowerScorer(load_model(out), builder, features.num_items)
    # The spectral branch as a build chooses it: on the validation split, then refitted on
    # what the test may see (training and validation events).
    branch = choose_spectral(seen, split, load_model(out), result.config)
    if branch.branch is not None:
        scorer = BranchedScorer(scorer, branch.branch, seen)
    metrics = evaluate(scorer, test)
    default = loss is LossKind.SOFTMAX and members is None
    return {
        "model": f"two-tower, {loss.value} loss"
        + (f" ({result.spec.members} members: default)" if default else "")
        + (", one tower" if members == 1 else "")
        + (", dot product" if tower.similarity is Similarity.DOT else ""),
        "params": {
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "batch": result.config.batch_size,
            "spectral": branch.reason,
        },
        "seconds": seconds,
        **metrics,
    }


def temporal_split(work: Path) -> tuple[FeatureSet, Any, pl.DataFrame]:
    """MovieLens-100K ingested, split leave-last-out; (features, split, train + valid)."""
    from data import movielens
    from recsys.core.settings import Settings

    data = movielens.fetch(Settings().datasets_dir)
    ingest(resolve_source(data), work / "ml-100k")
    features = FeatureSet.load(work / "ml-100k")
    split = leave_last_out(features.interactions, n_test=1, n_valid=1)
    return features, split, pl.concat([split.train, split.valid]).sort(ROW)


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    features, split, all_events = temporal_split(work)
    valid = eval_task(split.valid, features.restricted_to(split.train).histories)
    test = eval_task(split.test, features.restricted_to(all_events).histories)
    results = [two_tower(features, split, test, work, LossKind.SOFTMAX)]
    ours = results[0]
    peer_results = peers(features, split.train, all_events, valid, test, quick)
    results += peer_results
    best_peer = {k: max(r[k] for r in peer_results) for k in ("hit_rate@10", "hit_rate@100")}
    headers = ["model", *[f"HR@{k}" for k in KS], "NDCG@10", "Recall@20", "fit s", "chosen"]
    rows = [
        [
            r["model"],
            *[f"{r[f'hit_rate@{k}']:.4f}" for k in KS],
            f"{r['ndcg@10']:.4f}",
            f"{r['recall@20']:.4f}",
            f"{r['seconds']:.1f}",
            str(r["params"]),
        ]
        for r in results
    ]
    ratio10 = ours["hit_rate@10"] / best_peer["hit_rate@10"]
    ratio100 = ours["hit_rate@100"] / best_peer["hit_rate@100"]
    notes = (
        f"MovieLens-100K, {len(test)} test users, temporal leave-one-out, full ranking over "
        f"{features.num_items} items, seen items excluded. Two-tower / best peer: "
        f"HR@10 x{ratio10:.2f} (target >= 1.4), HR@100 x{ratio100:.2f} (target >= 1.00)."
    )
    save("quality", "Quality: MovieLens-100K leave-one-out", markdown_table(headers, rows), notes)
    _plot(results)
    return results


def run_losses(quick: bool, work: Path) -> list[dict[str, Any]]:
    """The losses on one tower each (a quarter of the default's time), beside the default
    loss's one-tower figure: part of the opt-in `ablations` section, which keeps the full
    run within its hour."""
    features, split, all_events = temporal_split(work)
    test = eval_task(split.test, features.restricted_to(all_events).histories)
    results = [
        two_tower(features, split, test, work, loss, members=1)
        for loss in (LossKind.SOFTMAX, LossKind.NPAIR, LossKind.TRIPLET)
    ]
    headers = ["model", *[f"HR@{k}" for k in KS], "NDCG@10", "fit s", "chosen"]
    rows = [
        [
            r["model"],
            *[f"{r[f'hit_rate@{k}']:.4f}" for k in KS],
            f"{r['ndcg@10']:.4f}",
            f"{r['seconds']:.1f}",
            str(r["params"]),
        ]
        for r in results
    ]
    notes = "MovieLens-100K, temporal leave-one-out as in the quality table, one tower each."
    save(
        "quality-losses",
        "Losses on one tower: MovieLens-100K leave-one-out",
        markdown_table(headers, rows),
        notes,
    )
    return results


def _plot(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for r in results:
        axis.plot(KS, [r[f"hit_rate@{k}"] for k in KS], "o-", label=r["model"])
    axis.set(xscale="log", xlabel="K", ylabel="HitRate@K", title="MovieLens-100K leave-one-out")
    axis.set_xticks(KS, [str(k) for k in KS])
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    fig.savefig(RESULTS_DIR / "quality.png", dpi=120)


def main() -> None:
    """The default two-tower row alone, for checking a change to the defaults on this
    protocol: `python -m bench.quality [train.symmetric=false ...]` (HR@K, NDCG@10)."""
    import argparse
    import logging
    import warnings

    from bench.quality_sets import parse_changes
    from recsys.core.settings import Settings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("changes", nargs="*", help="SECTION.KEY=VALUE (TOML value)")
    parser.add_argument("--work", type=Path, default=Settings().cache_dir / "bench" / "temporal")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    features, split, all_events = temporal_split(args.work)
    test = eval_task(split.test, features.restricted_to(all_events).histories)
    result = two_tower(
        features, split, test, args.work, LossKind.SOFTMAX, changes=parse_changes(args.changes)
    )
    print(
        f"{' '.join(args.changes) or 'defaults'}: "
        + " ".join(f"HR@{k} {result[f'hit_rate@{k}']:.4f}" for k in KS)
        + f" NDCG@10 {result['ndcg@10']:.4f} {result['params']} {result['seconds']:.0f}s"
    )


if __name__ == "__main__":
    main()
