"""Every setting of `recsys build`, from one TOML file: defaults live with the code that
owns them (`TowerConfig`, `TrainConfig`, `IndexTargets`, `RebuildPolicy`, `Compute`); a
file overrides them, command-line flags override the file. The resolved settings are
printed and stored in each version (`build_config.toml`, and the manifest).

    [train]
    temperature = 0.1
    losses = ["softmax"]          # NAME[:WEIGHT] as with --loss
    event_weights = {purchase = 1.0, view = 0.1}   # as with --event-weights
    target_events = ["purchase"]  # as with --events
    [tower]
    embedding_dim = 64
    [index]
    recall_at_100 = 0.95
    [rebuild]
    gate = true                   # false (or --no-gate): promote without comparing
    [compute]
    nproc = 1
"""

import dataclasses
import enum
import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

import tomli_w

from features.events import parse_event_weights
from features.sources import parse_columns
from recsys.core.errors import RecsysError
from serving.index import IndexTargets
from training.config import LossKind, TowerConfig, TrainConfig, parse_losses


@dataclass(frozen=True)
class RebuildPolicy:
    """How a build relates to the current version (all ignored for a first build)."""

    from_scratch: bool = False  # else warm-start from the current version when possible
    gate: bool = True  # compare a rebuild with the current version before promoting it
    # Tolerated loss against a reference, relative (0: none beyond noise; negative: demand an
    # improvement); the gate rejects only what is worse with 95% confidence (recsys.gate).
    gate_margin: float = 0.0
    keep_versions: int = 5  # versions kept on disk, the current one included

    def __post_init__(self) -> None:  # checked before any work: 0 failed after promotion
        if not 1 <= self.keep_versions <= 10_000:
            raise ValueError(
                f"keep_versions must be between 1 and 10,000, got {self.keep_versions!r}"
            )
        if not math.isfinite(self.gate_margin) or not -1.0 <= self.gate_margin <= 1.0:
            raise ValueError(f"gate_margin must be between -1 and 1, got {self.gate_margin!r}")


@dataclass(frozen=True)
class Compute:
    """Where training runs: `nproc` local ranks under torchrun (1: in this process)."""

    nproc: int = 1
    device: str = "cpu"  # or "cuda"


@dataclass(frozen=True)
class Inputs:
    """What a build reads (absolute paths). Each version remembers them, so that a plain
    `recsys build --artifacts DIR` rebuilds from the same log and tables."""

    data: str | None = None
    items: str | None = None
    users: str | None = None
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # ours -> the files'
    posted_events: bool = True  # also the events posted to the service (ARTIFACTS/events/)


@dataclass(frozen=True)
class BuildConfig:
    tower: TowerConfig = dataclasses.field(default_factory=TowerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    index: IndexTargets = dataclasses.field(default_factory=IndexTargets)
    rebuild: RebuildPolicy = dataclasses.field(default_factory=RebuildPolicy)
    compute: Compute = dataclasses.field(default_factory=Compute)
    inputs: Inputs = dataclasses.field(default_factory=Inputs)

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> "BuildConfig":
        """A copy with `{section: {setting: value}}` applied; `None` values are skipped (a
        flag that was not given)."""
        updated = {}
        for section, values in overrides.items():
            current = getattr(self, _section(section))
            names = {f.name: f for f in fields(current)}
            given = {k: v for k, v in values.items() if v is not None}
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise RecsysError(
                    f"[{section}]: unknown setting(s) {', '.join(unknown)}; "
                    f"known: {', '.join(sorted(names))}"
                )
            try:
                updated[section] = replace(
                    current, **{k: _parse(section, k, v, current) for k, v in given.items()}
                )
            except (TypeError, ValueError) as exc:
                raise RecsysError(f"[{section}]: {exc}") from exc
        return replace(self, **updated)

    @classmethod
    def from_file(cls, path: Path) -> "BuildConfig":
        return cls().with_file(path)

    def with_file(self, path: Path) -> "BuildConfig":
        """A copy with the settings of a TOML file applied."""
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise RecsysError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
        except OSError as exc:
            raise RecsysError(f"{path}: cannot read the config file ({exc.strerror})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise RecsysError(f"{path}: not valid TOML ({exc})") from exc
        for section, values in document.items():
            if not isinstance(values, dict):
                raise RecsysError(f"{path}: '{section}' must be a [section] of settings")
        try:
            return self.with_overrides(document)
        except RecsysError as exc:
            raise RecsysError(f"{path}: {exc}") from exc

    def remembered(self) -> "BuildConfig":
        """These settings as the base of the next build: the one-off choices of a run
        (`--from-scratch`, `--no-gate`) are not carried over."""
        return replace(self, rebuild=replace(self.rebuild, from_scratch=False, gate=True))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain TOML-able values (enums by value, losses as NAME:WEIGHT, no None)."""
        return {
            f.name: {
                k: _plain(v)
                for k, v in dataclasses.asdict(getattr(self, f.name)).items()
                if v is not None
            }
            for f in fields(self)
        }

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def current_settings(artifacts: Path) -> BuildConfig | None:
    """The settings the current version under `artifacts` was built with (None: no
    version yet, or one built before versions stored them)."""
    from recsys.core.layout import VersionLayout
    from recsys.core.versions import VersionStore

    store = VersionStore(artifacts)
    if not store.current_name():
        return None
    stored = VersionLayout(store.current()).build_config
    return BuildConfig.from_file(stored).remembered() if stored.is_file() else None


def _section(name: str) -> str:
    known = [f.name for f in fields(BuildConfig)]
    if name not in known:
        raise RecsysError(f"unknown section [{name}]; known: {', '.join(known)}")
    return name


def _parse(section: str, key: str, value: Any, current: Any) -> Any:
    """A TOML or flag value in the type the dataclass field holds."""
    if key == "losses":
        return parse_losses([value] if isinstance(value, str) else list(value))
    if section == "inputs" and key == "columns":
        if not isinstance(value, str | dict):
            raise TypeError(f"columns must be OURS=THEIRS pairs, got {value!r}")
        return parse_columns(value)
    if section == "inputs" and key != "posted_events":
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a path, got {value!r}")
        return value
    if key == "event_weights":
        if isinstance(value, str):
            return parse_event_weights(value)
        if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        ):
            raise TypeError(f"event_weights must map event types to numbers, got {value!r}")
        return {str(k): float(v) for k, v in value.items()}
    if key == "target_events":
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"target_events must be event type names, got {value!r}")
        return tuple(n.strip() for n in names if n.strip())
    default = getattr(current, key)
    if default is None:  # the type comes from the annotation (int | None, str | None)
        hint = get_type_hints(type(current))[key]
        wanted = [a for a in get_args(hint) if a is not type(None)] or [hint]
        if int in wanted and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{key} must be an integer, got {value!r}")
        if float in wanted and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TypeError(f"{key} must be a number, got {value!r}")
        if str in wanted and not isinstance(value, str):
            raise TypeError(f"{key} must be text, got {value!r}")
        return float(value) if float in wanted else value
    if isinstance(default, enum.Enum):
        return type(default)(value)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if default is not None and not isinstance(value, type(default)):
        raise TypeError(f"{key} must be a {type(default).__name__}, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        if value and isinstance(value[0], tuple | list) and isinstance(value[0][0], LossKind):
            return [f"{kind.value}:{weight:g}" for kind, weight in value]
        return [_plain(v) for v in value]
    return value
