"""Feature-stage settings, with their defaults next to the code that uses them."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FeatureConfig:
    """How raw tables become features.

    max_category_ratio: a side-table column is a categorical feature only if it has at most
        this many distinct values per row; near-unique columns (titles, zip codes) say
        nothing an ID does not already say.
    multi_value_separator: string cells containing it are split into several values
        (MovieLens' "Action|Comedy"); list-typed columns are multi-valued as they are.
    event_weights: weights of event types, written over the `weight` column of the events
        of those types (`--event-weights`), so that histories, training and serving all
        read one resolved weight.
    """

    max_category_ratio: float = 0.5
    multi_value_separator: str = "|"
    event_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.max_category_ratio <= 1.0:
            raise ValueError(f"max_category_ratio must be in (0, 1], got {self.max_category_ratio}")
