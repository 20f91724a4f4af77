"""`make demo`'s last step: start `recsys serve` on a built version, ask it for one user's
recommendations over HTTP, print them with the item titles, and stop the service."""

import argparse
import json
import urllib.request
from pathlib import Path

import polars as pl

from recsys.cli import out, show_recommendations
from recsys.core.layout import VersionLayout
from recsys.core.versions import VersionStore
from recsys.processes import served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--user", default="1")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    version = VersionStore(args.artifacts).current()
    with served(args.artifacts) as base:
        url = f"{base}/v1/users/{args.user}/recommendations"
        out.print(f"GET {url}?k={args.k}")
        with urllib.request.urlopen(f"{url}?k={args.k}", timeout=30) as response:
            answer = json.load(response)
    out.print(
        f"model_version={answer['model_version']} cached={answer['cached']} "
        f"fallback={answer['fallback']}"
    )
    recs = pl.DataFrame(
        {
            "user_id": [answer["user_id"]] * len(answer["items"]),
            "item_id": [item["item_id"] for item in answer["items"]],
            "rank": list(range(1, len(answer["items"]) + 1)),
            "score": [item["score"] for item in answer["items"]],
        }
    )
    layout = VersionLayout(version)
    item_ids = pl.read_parquet(layout.vocabulary("item_id"))["id"]
    recs = recs.with_columns(pl.col("item_id").cast(item_ids.dtype))
    show_recommendations(recs, layout.table("items"), 1)


if __name__ == "__main__":
    main()
