"""A nightly rebuild: the log grows by its last days, then the same data is rebuilt
warm-started from the current version and from scratch. Wall time, epochs, and the
quality of each on the same recent held-out slice (the quality gate's own comparison)."""

import json
import shutil
from pathlib import Path
from typing import Any

from bench.build import job
from bench.report import bar_chart, markdown_table, save
from data.daily import write_days
from data.synthetic import SyntheticConfig, generate

NEW_DAYS = 3  # of the synthetic log's 30


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    cfg = SyntheticConfig(rows=200_000 if quick else 300_000, seed=3)
    root = work / f"nightly-{cfg.rows}"
    full = root / "full"
    if not (full / "users.parquet").is_file():
        generate(full, cfg)
    log = root / "log"
    shutil.rmtree(log, ignore_errors=True)
    write_days(full, log, cfg.days - NEW_DAYS)
    base = root / "artifacts-yesterday"
    first = job(log, base, None)
    write_days(full, log)  # the new days arrive
    results = [{"case": "yesterday's build (from scratch)", **first}]
    for label, flags in (
        ("nightly rebuild, warm-started", ()),
        ("nightly rebuild, from scratch", ("--from-scratch",)),
    ):
        artifacts = root / f"artifacts-{'scratch' if flags else 'warm'}"
        shutil.rmtree(artifacts, ignore_errors=True)
        shutil.copytree(base, artifacts, symlinks=True)
        measured = job(log, artifacts, None, "--keep-artifacts", *flags)
        results.append({"case": label, **measured})
        print(json.dumps(results[-1]), flush=True)

    def gate(r: dict[str, Any], key: str) -> str:
        return f"{r['gate'][key]:.4f}" if r.get("gate") else "-"

    rows = [
        [
            r["case"],
            f"{r['rows']:,}",
            r["epochs"],
            f"{r['train_s']:.0f}",
            f"{r['total_s']:.0f}",
            gate(r, "candidate"),
            gate(r, "current"),
            r["gate"]["users"] if r.get("gate") else "-",
            "yes" if r["promoted"] else "no",
        ]
        for r in results
    ]
    headers = [
        "case",
        "rows",
        "epochs",
        "train s",
        "total s",
        "recall@20, new version",
        "recall@20, yesterday's",
        "slice users",
        "promoted",
    ]
    rebuilds = results[1:]
    ratio = rebuilds[0]["total_s"] / rebuilds[1]["total_s"]
    notes = (
        f"Synthetic log ({cfg.rows:,} events over {cfg.days} days, `data/synthetic.py` seed "
        f"{cfg.seed}); yesterday's version was built on the first {cfg.days - NEW_DAYS} days, "
        f"then {NEW_DAYS} days arrive. Both rebuilds start from a copy of the same artifacts "
        "and run `recsys build` defaults (warm budget: a third of the epochs yesterday's "
        "from-scratch build ran; early stopping on). Recall@20 is the quality gate's: the "
        "new and yesterday's version on the same recent slice (each user's last event, when "
        f"it is newer than yesterday's data). Warm / scratch wall time: {ratio:.2f}."
    )
    save(
        "nightly",
        "Nightly rebuild: warm start against from scratch",
        markdown_table(headers, rows),
        notes,
    )
    bar_chart(
        "nightly",
        "Nightly rebuild",
        {r["case"]: {"total s": r["total_s"]} for r in rebuilds},
        "wall time, s",
    )
    return results
