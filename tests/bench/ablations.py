"""Opt-in (`make bench ONLY=ablations`, never part of the full run, which must stay within
its hour): what each choice of the defaults is worth, measured again. The losses on one
tower each under the temporal protocol, and the ensemble and the skip path switched back
one at a time under the no-timestamp protocol (MovieLens-100K); and what `recsys tune`'s
settings score on that protocol's test items."""

from pathlib import Path
from typing import Any

from bench import quality, quality_sets, tuning


def run(quick: bool, work: Path) -> list[dict[str, Any]]:
    return (
        quality.run_losses(quick, work)
        + quality_sets.run_ablations(quick, work)
        + tuning.run(quick, work, tuned_build=True)
    )
