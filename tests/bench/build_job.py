"""One `recsys build` in a fresh process, so that peak RSS is this build's alone.
Prints one JSON line."""

import argparse
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from bench.report import peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--from-scratch", action="store_true")
    parser.add_argument("--no-refit", action="store_true", help="stop after early stopping")
    parser.add_argument("--keep-artifacts", action="store_true", help="rebuild on top of them")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from features.sources import resolve_source
    from recsys.pipeline import RebuildPolicy, build
    from training.config import TrainConfig

    if not args.keep_artifacts:
        shutil.rmtree(args.artifacts, ignore_errors=True)
    started = time.perf_counter()
    report = build(
        resolve_source(args.data),
        args.artifacts,
        config=TrainConfig(max_epochs=args.epochs, refit=not args.no_refit),
        progress=False,
        policy=RebuildPolicy(from_scratch=args.from_scratch),
    )
    print(
        json.dumps(
            {
                "rows": report.ingest.read,
                "users": report.ingest.users,
                "items": report.ingest.items,
                "epochs": report.train.epochs_run,
                "batch": report.train.config.batch_size,
                "train_s": report.train.seconds,
                "total_s": time.perf_counter() - started,
                "examples_per_s": max(h["examples_per_s"] for h in report.train.history),
                "valid_hit_rate@10": report.train.best_metrics["hit_rate@10"],
                "index_backend": report.index.backend,
                "index_trees": report.index.n_trees,
                "index_recall@100": report.index.serving_recall_at_100,
                "index_build_s": report.index.build_seconds_total,
                "peak_rss_mb": peak_rss_mb(),
                "warm_start_from": report.warm_start_from,
                "promoted": report.promoted,
                "gate": asdict(report.gate) if report.gate else None,
            }
        )
    )


if __name__ == "__main__":
    main()
