"""`recsys tune` against its budget: wall time of the whole command (interpreter start-up
included) for a given `--budget-minutes`, the trials it fitted and its best validation
score against the defaults'. With `tuned_build` (the opt-in `ablations` section: a
default-sized build, outside the full run's hour) the tuned settings also build a version
scored on the held-out test items of the `quality-sets` protocol (MovieLens-100K without
timestamps), next to the defaults' row there."""

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from bench.quality_sets import EmbeddingScorer, _indexed, holdout_files, two_tower
from bench.report import markdown_table, save
from features.feature_set import FeatureSet
from recsys.build_config import BuildConfig
from training.evaluate import eval_task, evaluate

HEADER = re.compile(
    r"(?P<trials>\d+) trials in (?P<minutes>[\d.]+) min; validation recall@20 "
    r"(?P<best>[\d.]+) \(defaults: (?P<defaults>[-\d.]+)\)"
)


def run(quick: bool, work: Path, tuned_build: bool = False) -> list[dict[str, Any]]:
    from data import movielens
    from recsys.core.settings import Settings

    events = pl.read_parquet(movielens.fetch(Settings().datasets_dir) / "interactions.parquet")
    train_path, test_pairs = holdout_files(events, work / "tune-ml-100k")
    rows: list[dict[str, Any]] = []
    for budget in (1.0,) if quick else (2.0,):
        out = work / f"tuned-{budget:g}.toml"
        started = time.perf_counter()
        command = [sys.executable, "-m", "recsys", "tune", "--data", str(train_path)]
        command += ["--budget-minutes", str(budget), "--out", str(out), "--no-progress"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        found = HEADER.search(out.read_text().splitlines()[0])
        assert found is not None, out.read_text()[:300]
        row = {
            "budget": budget,
            "wall": wall / 60,
            "trials": int(found["trials"]),
            "best": float(found["best"]),
            "defaults": float(found["defaults"]),
        }
        if tuned_build:
            row["test"] = _tuned_test_recall(out, train_path, test_pairs, work)
        rows.append(row)
    headers = ["budget min", "wall min", "of budget", "trials", "valid R@20 best"]
    headers += ["valid R@20 defaults"] + (["test R@20 tuned"] if tuned_build else [])
    table = markdown_table(
        headers,
        [
            [
                f"{r['budget']:g}",
                f"{r['wall']:.2f}",
                f"{r['wall'] / r['budget']:.0%}",
                r["trials"],
                f"{r['best']:.4f}",
                f"{r['defaults']:.4f}",
                *([f"{r['test']:.4f}"] if tuned_build else []),
            ]
            for r in rows
        ],
    )
    notes = (
        "`recsys tune --data TRAIN --budget-minutes B` on the training 80% of the "
        "quality-sets protocol (MovieLens-100K without timestamps), timed as a whole "
        "command."
    )
    if tuned_build:
        notes += (
            " The tuned file then builds a version scored on the 20% test items (compare "
            "the default build's row in the quality-sets table)."
        )
    save(
        "tuning-tuned-build" if tuned_build else "tuning",
        "recsys tune against its budget",
        table,
        notes,
    )
    return rows


def _tuned_test_recall(
    config: Path, train_path: Path, test_pairs: pl.DataFrame, work: Path
) -> float:
    """Test Recall@20 of a build with the tuned settings of `config`."""
    tuned = BuildConfig.from_file(config).to_dict()
    changes = {k: tuned[k] for k in ("tower", "train")}
    _, version = two_tower(train_path, work / "tune-ml-100k", "tuned", changes)
    features = FeatureSet.load(version / "data")
    test = eval_task(_indexed(test_pairs, version / "data"), features.histories)
    return float(evaluate(EmbeddingScorer(version), test)["recall@20"])
