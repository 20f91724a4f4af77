"""`recsys tune`: search the few build settings that matter on the validation split alone
(never a test set), within a time budget, and write the best as a `--config` file.

The search is Optuna's TPE sampler. The first trial is always the defaults, so the file
written is never worse than the defaults on validation. Every trial trains on the same
ingested data and split as `recsys build` would, and stops early at the budget: a trial
that cannot finish another epoch before the deadline ends with the best epoch it had, and
a new trial starts while one more epoch still fits.
"""

import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from features.config import FeatureConfig
from features.feature_set import FeatureSet
from features.ingest import ingest
from features.sources import DataSource
from recsys.build_config import BuildConfig
from recsys.core.errors import RecsysError
from training.config import TowerConfig
from training.trainer import build_split, train

log = logging.getLogger(__name__)

# What the search varies: (section, setting) -> how to draw it. Chosen from the quality
# benchmarks: the popularity correction, the softmax temperature, the learning rates and
# the ID dropout moved validation recall the most; tower sizes did little.
SPACE: dict[tuple[str, str], Callable[[optuna.Trial], Any]] = {
    ("train", "temperature"): lambda t: t.suggest_float("temperature", 0.03, 0.3, log=True),
    ("train", "logq_correction"): lambda t: t.suggest_float("logq_correction", 0.5, 2.0),
    ("train", "learning_rate"): lambda t: t.suggest_float("learning_rate", 3e-4, 1e-2, log=True),
    ("train", "embedding_learning_rate"): lambda t: t.suggest_float(
        "embedding_learning_rate", 0.005, 0.2, log=True
    ),
    ("train", "weight_decay"): lambda t: t.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
    ("tower", "id_dropout"): lambda t: t.suggest_float("id_dropout", 0.0, 0.8),
}


class OutOfTime(Exception):
    """Raised from the epoch callback when the next epoch would pass the deadline."""


@dataclass
class TuneResult:
    best: BuildConfig
    best_value: float
    default_value: float
    metric: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _overrides(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section, name in SPACE:
        if name in params:
            out.setdefault(section, {})[name] = params[name]
    return out


def tune(
    source: DataSource,
    budget_minutes: float,
    base: BuildConfig | None = None,
    seed: int = 0,
    max_trials: int | None = None,
    progress: bool = True,
    spent_seconds: float = 0.0,
) -> TuneResult:
    """Search within `budget_minutes` of wall time (ingest included), of which
    `spent_seconds` went before the call (the command's start-up: importing torch alone
    takes seconds, and a user times the whole command)."""
    started = time.monotonic() - spent_seconds
    deadline = started + budget_minutes * 60.0
    base = base or BuildConfig()
    metric = f"recall@{base.train.eval_k}"
    with tempfile.TemporaryDirectory(prefix="recsys-tune-") as tmp:
        # The log as the build reads it: event weights over the weight column (the targets
        # are applied by the split and the loss, from base.train as in a build).
        ingest(
            source, Path(tmp) / "data", FeatureConfig(event_weights=dict(base.train.event_weights))
        )
        features = FeatureSet.load(Path(tmp) / "data")
    device = torch.device(base.compute.device)
    if base.compute.nproc > 1:
        log.info(
            "tune: trials run in one process on %s; [compute] nproc = %d is kept for the build",
            device,
            base.compute.nproc,
        )
    split = build_split(features, base.train)
    trials: list[dict[str, Any]] = []
    longest_epoch, setup = [0.0], [0.0]  # seconds, over all trials so far

    def objective(trial: optuna.Trial) -> float:
        params = {name: draw(trial) for (_, name), draw in SPACE.items()}
        # A trial is judged on validation alone: the refit on every event would not change
        # its score, only double its time.
        overrides = _overrides(params)
        overrides["train"] = {**overrides.get("train", {}), "refit": False}
        config = base.with_overrides(overrides)
        config = replace(config, tower=member_tower(config.tower, features, split.train.height))
        best = -1.0
        epoch_seconds: list[float] = []
        trial_start = time.monotonic()

        def on_epoch(record: dict[str, Any]) -> None:
            nonlocal best
            best = max(best, record[f"valid_{metric}"])
            if not epoch_seconds:  # model set-up: the time before the first epoch began
                setup[0] = max(setup[0], time.monotonic() - trial_start - record["seconds"])
            epoch_seconds.append(record["seconds"])
            longest_epoch[0] = max(longest_epoch[0], record["seconds"])
            trial.report(record[f"valid_{metric}"], record["epoch"])
            if time.monotonic() + max(epoch_seconds) > deadline:
                raise OutOfTime

        stopped = False
        try:
            train(
                features,
                split,
                config.tower,
                config.train,
                device=device,
                progress=False,
                on_epoch=on_epoch,
            )
        except OutOfTime:
            stopped = True
        seconds = time.monotonic() - trial_start
        trials.append(
            {
                "trial": trial.number,
                **params,
                metric: best,
                "epochs": len(epoch_seconds),
                "seconds": round(seconds, 1),
                "cut by budget": stopped,
            }
        )
        if best < 0:
            raise optuna.TrialPruned("no epoch finished within the budget")
        return best

    def out_of_time(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Stop when not even one more epoch (the slowest so far, plus a trial's set-up)
        would fit: a started trial is cut at the deadline with its best epoch, so the
        budget is used to within about one epoch."""
        if time.monotonic() + longest_epoch[0] + setup[0] > deadline:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    defaults = {name: _current(base, section, name) for section, name in SPACE}
    study.enqueue_trial(defaults)
    remaining = max(1.0, deadline - time.monotonic())
    study.optimize(
        objective,
        n_trials=max_trials,
        timeout=remaining,
        callbacks=[out_of_time],
        show_progress_bar=progress and sys.stderr.isatty(),  # no redraws in a log file
        catch=(),
    )
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise RecsysError("no trial finished an epoch within the budget: give it more minutes")
    best_trial = max(completed, key=lambda t: t.value if t.value is not None else -math.inf)
    default_value = trials[0][metric] if trials else -1.0
    return TuneResult(
        best=base.with_overrides(_overrides(best_trial.params)),
        best_value=float(best_trial.value or 0.0),
        default_value=float(default_value),
        metric=metric,
        trials=trials,
        seconds=time.monotonic() - started,
    )


def member_tower(tower: TowerConfig, features: FeatureSet, train_events: int) -> TowerConfig:
    """One member of the towers the build would train: the settings searched are a
    member's, and the build's ensemble (small logs) trains every member with them, so a
    trial takes 1/members of the time. The member keeps the build's width (a lone tower
    would default to 256-d where the build's four members are 64-d)."""
    build = tower.resolve(train_events, id_rows=features.num_users + features.num_items)
    return replace(tower, members=1, embedding_dim=build.embedding_dim)


def _current(config: BuildConfig, section: str, name: str) -> Any:
    return getattr(getattr(config, section), name)
