"""One measured run of ingest + feature build (ours or the pandas peer) in a fresh process,
so that peak RSS belongs to that job alone. Prints one JSON line."""

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.report import peak_rss_mb

BATCH = 8192


def ours(data: Path, out: Path, history_length: int) -> dict[str, float]:
    from features.feature_set import FeatureSet
    from features.ingest import ingest
    from features.sources import resolve_source
    from features.splits import leave_last_out

    started = time.perf_counter()
    report = ingest(resolve_source(data / "interactions"), out)
    ingested = time.perf_counter()
    features = FeatureSet.load(out)
    split = leave_last_out(features.interactions, n_test=1, n_valid=1)
    rows = split.train["row"].to_numpy()
    gathered = 0
    for start in range(0, len(rows), BATCH):
        values, _ = features.histories.previous_items(rows[start : start + BATCH], history_length)
        gathered += len(values)
    done = time.perf_counter()
    return {
        "rows": report.read,
        "kept": report.kept,
        "ingest_s": ingested - started,
        "features_s": done - ingested,
        "history_items": gathered,
    }


def pandas_peer(data: Path, out: Path, history_length: int) -> dict[str, float | None]:
    """The ingest step written the common way: eager pandas, whole log in memory.
    (Only ingest: the history features would be the same NumPy code as ours.)"""
    import pandas as pd

    started = time.perf_counter()
    frame = pd.read_parquet(data / "interactions")
    rows = len(frame)
    frame = frame.dropna(subset=["user_id", "item_id", "timestamp"]).drop_duplicates()
    frame["user_idx"], users = pd.factorize(frame["user_id"], sort=True)
    frame["item_idx"], items = pd.factorize(frame["item_id"], sort=True)
    frame = frame.sort_values(["user_idx", "timestamp"], kind="stable").reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    frame[["user_idx", "item_idx", "timestamp"]].to_parquet(out / "interactions.parquet")
    pd.Series(users).to_frame("id").to_parquet(out / "users.parquet")
    pd.Series(items).to_frame("id").to_parquet(out / "items.parquet")
    return {
        "rows": rows,
        "kept": len(frame),
        "ingest_s": time.perf_counter() - started,
        "features_s": None,
        "history_items": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["ours", "pandas"], required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--history-length", type=int, default=50)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    job = ours if args.engine == "ours" else pandas_peer
    result = job(args.data, args.out, args.history_length)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
