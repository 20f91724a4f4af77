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
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import ValidationError, field_validator

from features.sources import parse_columns
from recsys.core.errors import RecsysError
from recsys.core.typed_settings import (
    described,
    number,
    one_line,
    parse_assignment,
    settings_section,
    switch,
    whole,
)
from serving.index import IndexTargets
from training.config import LossKind, TowerConfig, TrainConfig


@settings_section
class RebuildPolicy:
    """How a build relates to the current version (all ignored for a first build)."""

    from_scratch: bool = switch(
        False, "train from scratch; else warm-start from the current version when possible"
    )
    gate: bool = switch(True, "compare a rebuild with the current version before promoting")
    # Tolerated loss against a reference, relative (0: none beyond noise; negative: demand an
    # improvement); the gate rejects only what is worse with 95% confidence (recsys.gate).
    gate_margin: float = number(
        0.0, -1.0, 1.0, "tolerated relative loss against the current version (0: none)"
    )
    keep_versions: int = whole(
        5, 1, 10_000, "versions kept on disk, the current one included"
    )  # checked before any work: 0 failed after promotion


@settings_section
class Compute:
    """Where training runs: `nproc` local ranks under torchrun (1: in this process)."""

    nproc: int = whole(1, 1, 1024, "local ranks under torchrun (1: in this process)")
    device: Literal["cpu", "cuda"] = described("cpu", "where training runs")


@settings_section
class Inputs:
    """What a build reads (absolute paths). Each version remembers them, so that a plain
    `recsys build --artifacts DIR` rebuilds from the same log and tables."""

    data: str | None = described(None, "the interaction log (a file or a directory)", strict=True)
    items: str | None = described(None, "the item table", strict=True)
    users: str | None = described(None, "the user table", strict=True)
    columns: dict[str, str] = described(
        {}, "our column name = the files' (OURS=THEIRS,... or a table)"
    )
    posted_events: bool = switch(True, "also the events posted to the service (ARTIFACTS/events/)")

    @field_validator("columns", mode="before")
    @classmethod
    def _columns_as_text(cls, value: Any) -> Any:
        if not isinstance(value, str | dict):
            raise ValueError("columns must be OURS=THEIRS pairs")
        return parse_columns(value)


@settings_section
class BuildConfig:
    tower: TowerConfig = dataclasses.field(default_factory=TowerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    index: IndexTargets = dataclasses.field(default_factory=IndexTargets)
    rebuild: RebuildPolicy = dataclasses.field(default_factory=RebuildPolicy)
    compute: Compute = dataclasses.field(default_factory=Compute)
    inputs: Inputs = dataclasses.field(default_factory=Inputs)

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> "BuildConfig":
        """A copy with `{section: {setting: value}}` applied; `None` values are skipped (a
        flag that was not given). Every value goes through the section's schema."""
        updated = {}
        for section, values in overrides.items():
            current = getattr(self, _section(section))
            names = {f.name for f in fields(current)}
            given = {k: v for k, v in values.items() if v is not None}
            unknown = sorted(set(given) - names)
            if unknown:
                raise RecsysError(
                    f"[{section}]: unknown setting(s) {', '.join(unknown)}; "
                    f"known: {', '.join(sorted(names))}"
                )
            try:
                updated[section] = replace(current, **given)
            except ValidationError as exc:
                raise RecsysError(one_line(exc, section)) from None
            except (TypeError, ValueError) as exc:
                raise RecsysError(f"[{section}] {exc}") from None
        return replace(self, **updated)

    def with_assignments(self, assignments: list[str]) -> "BuildConfig":
        """A copy with `--set section.key=value` pairs applied, in order."""
        overrides: dict[str, dict[str, Any]] = {}
        for text in assignments:
            try:
                section, key, value = parse_assignment(text)
            except ValueError as exc:
                raise RecsysError(str(exc)) from None
            overrides.setdefault(section, {})[key] = value
        return self.with_overrides(overrides)

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


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        if value and isinstance(value[0], tuple | list) and isinstance(value[0][0], LossKind):
            return [f"{kind.value}:{weight:g}" for kind, weight in value]
        return [_plain(v) for v in value]
    return value
