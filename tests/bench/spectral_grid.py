"""The spectral filter alone over a grid of normalisation exponents, output exponents and
ranks, on a validation holdout of `bench.quality_sets`' training part (the test part is
never read): how the defaults of `training.spectral` were chosen.

    PYTHONPATH=tests python -m bench.spectral_grid --checkins 1000000 --normalisation 0.3 0.4 0.5

`--refit RANK` instead compares the ways a build can refit the branch on more events than
it was chosen on (chosen on 80% of the fitting rows, refitted on all of them): cold at
RANK, cold at the largest rank, or begun from the smaller fit's basis.
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from bench.quality_sets import holdout_files
from data import checkins
from features.history import UserHistories
from features.splits import random_holdout
from recsys.core import schema as s
from training import spectral
from training.embed import PrecomputedScorer
from training.evaluate import EvalTask, eval_task, evaluate, sample_task

VALID_SHARE = 0.2
VALID_USERS = 10_000  # as `train.max_valid_users`


def indexed_training_part(rows: int, work: Path) -> pl.DataFrame:
    """The benchmark's training part of a check-in log, with dense user and item indices."""
    log = checkins.generate(work / f"checkins-{rows}", checkins.CheckinConfig(rows, seed=7))
    train_path, _ = holdout_files(pl.read_parquet(log / "interactions.parquet"), work / "split")
    train = pl.read_parquet(train_path)
    return train.with_columns(
        pl.col(s.USER_ID).rank("dense").cast(pl.Int64).sub(1).alias(s.USER_IDX),
        pl.col(s.ITEM_ID).rank("dense").cast(pl.Int64).sub(1).alias(s.ITEM_IDX),
        pl.lit(None, pl.Int64).alias(s.TIMESTAMP),
    )


def _validation(events: pl.DataFrame) -> tuple[int, int, pl.DataFrame, EvalTask]:
    """Users, items (dense), the fitting rows and the validation task of a training part."""
    users, items = events[s.USER_IDX].n_unique(), events[s.ITEM_IDX].n_unique()
    split = random_holdout(events, VALID_SHARE, seed=1)
    fit = split.train.sort(s.USER_IDX, s.ITEM_IDX)
    histories = UserHistories.from_interactions(fit, users)
    return users, items, fit, sample_task(eval_task(split.valid, histories), VALID_USERS)


def grid(
    events: pl.DataFrame,
    exponents: list[float],
    outputs: list[float],
    ranks: list[int],
    share: float = 1.0,
) -> list[dict[str, float]]:
    """The filter alone at each setting, fitted on `share` of the fitting rows (the same
    validation task: how the best rank moves with the events)."""
    users, items, fit, task = _validation(events)
    if share < 1:
        fit = random_holdout(fit.drop("row", strict=False), 1 - share, seed=3).train
    matrix = spectral.interaction_matrix(fit, users, items)
    ranks = [r for r in ranks if r < min(users, items) // 2]
    rows = []
    for exponent in exponents:
        started = time.perf_counter()
        basis = spectral.decompose(matrix, max(ranks), normalisation=exponent)
        seconds = time.perf_counter() - started
        for rank in ranks:
            parts = basis.branch(rank).users(matrix[task.users])
            for output in outputs:
                scorer = PrecomputedScorer(task.users, parts, basis.branch(rank, output).item_rows)
                recall = evaluate(scorer, task)["recall@20"]
                rows.append(
                    {"normalisation": exponent, "output": output, "rank": rank, "recall@20": recall}
                )
                print(f"e {exponent} g {output} rank {rank}: {recall:.4f}", flush=True)
        print(f"decomposition at e {exponent}: {seconds:.0f} s", flush=True)
    return rows


def refits(events: pl.DataFrame, rank: int, largest: int, exponent: float) -> None:
    """Validation Recall@20 and seconds of each way to refit the branch at `rank` on all of
    the fitting rows, the choice's basis (of `largest`) fitted on 80% of them."""
    users, items, fit, task = _validation(events)
    matrix = spectral.interaction_matrix(fit, users, items)
    part = random_holdout(fit.drop("row", strict=False), VALID_SHARE, seed=3).train
    chosen_on = spectral.decompose(
        spectral.interaction_matrix(part, users, items), largest, normalisation=exponent
    )
    ways: dict[str, Callable[[], spectral.Basis]] = {
        f"cold at rank {rank}": lambda: spectral.decompose(matrix, rank, normalisation=exponent),
        f"cold at rank {largest}": lambda: spectral.decompose(
            matrix, largest, normalisation=exponent
        ),
        f"from the 80% basis of {largest}": lambda: spectral.decompose(
            matrix, largest, normalisation=exponent, start=chosen_on
        ),
    }
    for name, way in ways.items():
        started = time.perf_counter()
        branch = way().branch(rank)
        seconds = time.perf_counter() - started
        scorer = PrecomputedScorer(task.users, branch.users(matrix[task.users]), branch.item_rows)
        print(f"{name}: {evaluate(scorer, task)['recall@20']:.4f} ({seconds:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkins", type=int, default=100_000)
    parser.add_argument("--normalisation", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--output", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(spectral.RANKS))
    parser.add_argument("--work", type=Path, default=Path("bench_results/spectral_grid"))
    parser.add_argument("--refit", type=int, help="compare the refits at this rank instead")
    parser.add_argument("--share", type=float, default=1.0, help="of the fitting rows")
    args = parser.parse_args()
    events = indexed_training_part(args.checkins, args.work)
    if args.refit:
        refits(events, args.refit, max(args.ranks), args.normalisation[0])
        return
    rows = grid(events, args.normalisation, args.output, args.ranks, args.share)
    best = max(rows, key=lambda row: row["recall@20"])
    for exponent in args.normalisation:
        mine = max(
            (r for r in rows if r["normalisation"] == exponent), key=lambda r: r["recall@20"]
        )
        print(f"best at e {exponent}: {mine}")
    print(f"best: {best}")


if __name__ == "__main__":
    main()
