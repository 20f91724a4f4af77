"""What each event counts for: its weight in the loss, and whether it is a target.

A row's `weight` column weights its training example (a purchase at 1.0 counts ten times a
view at 0.1). `event_weights` maps event types to weights and overrides the column for
the types it names. No event counts more than WEIGHT_CEILING times the log's median
weight (`weight_cap`): two posted events at the largest weight a route accepts (10^6)
once made their items the nearest neighbours of everything in the next build.
`target_events` keeps only those types as training and validation targets; every event
still feeds the users' histories. A row of weight 0 is never a target."""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from recsys.core import schema as s

WEIGHT_CEILING = 10.0  # x the median weight of the log's weighted events: the most one counts


def weight_cap(median: float | None) -> float | None:
    """The largest weight an event of the log's own weight column counts at: WEIGHT_CEILING
    x the median of the log's positive weights (None: it has none). Weights the build's
    settings give event types (`event_weights`) are trusted and never capped."""
    return WEIGHT_CEILING * median if median is not None and median > 0 else None


@dataclass(frozen=True)
class EventRule:
    event_weights: dict[str, float] = field(default_factory=dict)  # event type -> weight
    target_events: tuple[str, ...] = ()  # empty: every event type is a target

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.event_weights.items() if not (v >= 0 and np.isfinite(v))}
        if bad:
            raise ValueError(f"event weights must be finite and >= 0, got {bad}")

    def weights(self, interactions: pl.DataFrame) -> np.ndarray:
        """(E,) float32: each row's example weight (0 for rows that are not targets)."""
        weight = pl.col(s.WEIGHT).fill_null(1.0).cast(pl.Float64)
        for event, value in self.event_weights.items():
            weight = pl.when(pl.col(s.EVENT) == event).then(pl.lit(value)).otherwise(weight)
        if self.target_events:
            weight = pl.when(pl.col(s.EVENT).is_in(list(self.target_events))).then(weight)
            weight = weight.otherwise(0.0)
        values = interactions.select(weight.alias("w"))["w"].to_numpy()
        return values.astype(np.float32)

    def is_target(self, interactions: pl.DataFrame) -> pl.Series:
        """Rows that are targets: a target event type (if any are named) of weight > 0."""
        return pl.Series("target", self.weights(interactions) > 0)

    def describe(self) -> dict[str, Any]:
        """For the manifest: the rule a build used."""
        return {
            "weights": "event_weights over the weight column" if self.event_weights else "column",
            "event_weights": dict(self.event_weights),
            "target_events": list(self.target_events) or "all",
        }


def parse_event_weights(text: str) -> dict[str, float]:
    """'purchase=1,cart=0.5,view=0.1' -> {'purchase': 1.0, 'cart': 0.5, 'view': 0.1}."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, value = part.partition("=")
        try:
            if not equals or not name.strip():
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"event weights are EVENT=WEIGHT pairs separated by commas, got {part!r}"
            ) from None
    return weights


def weights_differ(interactions: pl.DataFrame) -> bool:
    """Whether the log's events carry different weights (after `event_weights`): only
    then do weighted bags say more than plain means."""
    weights = interactions[s.WEIGHT].fill_null(1.0)
    return interactions.height > 0 and weights.min() != weights.max()
