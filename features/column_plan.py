"""What each input column will become, decided by the rules a build applies, without
running one (`recsys build --dry-run`): the log's columns by name, a side table's by
`column_verdict`, the same function ingest uses."""

from dataclasses import dataclass

from features.config import FeatureConfig
from features.events import EventRule
from features.side_tables import column_verdict, read_side_table
from features.sources import DataSource, scan_table
from recsys.core import schema as s


@dataclass(frozen=True)
class ColumnPlan:
    table: str  # "log", "items" or "users"
    column: str  # the name in the file
    becomes: str


def plan_columns(
    source: DataSource, config: FeatureConfig, events: EventRule | None = None
) -> list[ColumnPlan]:
    """One line per column of the log files (their union) and of each side table."""
    theirs = {
        ours: source.columns.get(ours, ours) for ours in s.REQUIRED_COLUMNS + s.OPTIONAL_COLUMNS
    }
    strings = (s.USER_ID, s.ITEM_ID)
    seen: dict[str, None] = {}
    for path in source.interactions:
        for name in scan_table(path, strings, source.columns).collect_schema().names():
            seen[name] = None
    plans = [ColumnPlan("log", _named(name, theirs), _log_role(name, events)) for name in seen]
    plans += [ColumnPlan("log", f"({name})", why) for name, why in _absent(seen, events)]
    for side, table_path, key in (
        ("items", source.items, s.ITEM_ID),
        ("users", source.users, s.USER_ID),
    ):
        if table_path is None:
            continue
        table, _, _ = read_side_table(table_path, key, source.columns)
        plans.append(ColumnPlan(side, _named(key, theirs), f"the key ({table.height:,} rows)"))
        for name in table.columns:
            if name != key:
                plans.append(ColumnPlan(side, name, column_verdict(table[name], config).describe()))
    return plans


def _named(ours: str, theirs: dict[str, str]) -> str:
    """The file's name for a column, with ours beside it where a mapping renamed it."""
    original = theirs.get(ours, ours)
    return ours if original == ours else f"{original} -> {ours}"


def _log_role(name: str, events: EventRule | None) -> str:
    if name == s.USER_ID:
        return "user ID (the user tower's ID row; refused: null, empty)"
    if name == s.ITEM_ID:
        return "item ID (the item tower's ID row; refused: null, empty)"
    if name == s.TIMESTAMP:
        return "event time: orders histories, splits validation by time"
    if name == s.WEIGHT:
        return "event weight (refused: negative, not finite, above 1e+06)"
    if name == s.EVENT:
        rule = events or EventRule({}, ())
        weights = ", ".join(f"{k}={v:g}" for k, v in rule.event_weights.items()) or "none set"
        targets = ", ".join(rule.target_events) or "every type"
        return f"event type (weights: {weights}; targets: {targets})"
    return "not used (the log's extra columns are no features: put them in an item or user table)"


def _absent(seen: dict[str, None], events: EventRule | None) -> list[tuple[str, str]]:
    missing = []
    if s.TIMESTAMP not in seen:
        missing.append((s.TIMESTAMP, "absent: a set log (validation items drawn per user)"))
    if s.WEIGHT not in seen:
        missing.append((s.WEIGHT, "absent: every event weighs 1"))
    if (
        s.EVENT not in seen
        and events is not None
        and (events.event_weights or events.target_events)
    ):
        missing.append((s.EVENT, "absent: event weights and targets have nothing to apply to"))
    return missing
