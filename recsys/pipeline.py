"""`recsys build`: ingest -> train -> embed items and users -> build the index -> seal a new
version -> quality gate -> promote it to current -> prune old versions.

Every step writes into a staging directory, so a failure or a kill anywhere leaves the
current version untouched; a lock keeps two builds of one artifacts directory apart. A
rebuild on a grown log warm-starts from the current version and is promoted only if it
passes the quality gate against it (`recsys.gate`); a rejected candidate stays on disk,
committed but not current, for inspection."""

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import redis
from safetensors import safe_open

from features.catalogue_log import ItemChange, changes_path, merged_item_table
from features.config import FeatureConfig
from features.event_log import Event, EventSnapshot, events_dir, snapshot
from features.event_stream import START, STREAM_MARK, EventLogSettings
from features.events import weights_differ
from features.feature_set import FeatureSet
from features.ingest import IngestReport, ingest
from features.sources import DataSource
from features.splits import Split
from recsys.build_config import BuildConfig, Compute, Inputs, RebuildPolicy
from recsys.core import schema as s
from recsys.core.artifacts import read_manifest
from recsys.core.errors import ArtifactError, RecsysError
from recsys.core.layout import VersionLayout
from recsys.core.lock import build_lock
from recsys.core.versions import VersionStore
from recsys.gate import GateDecision, last_timestamp, not_comparable, quality_gate
from serving.index import IndexParams, IndexTargets, build_index
from training.batches import BatchBuilder
from training.cluster import Cluster
from training.config import Similarity, TowerConfig, TrainConfig, warm_budget
from training.embed import TowerScorer, item_embeddings, user_embeddings_now
from training.export import SPEC, load_model, version_towers
from training.fit import TRAIN_CONFIG, fit_model
from training.model import ModelSpec, TwoTower, model_spec
from training.spectral import Spectral, interaction_matrix
from training.spectral_choice import choose as choose_spectral
from training.trainer import TrainResult, build_split
from training.warm_start import warm_start_problem

log = logging.getLogger(__name__)

INDEX_QUERY_SAMPLE = 1000
MIN_ITEMS = 2  # with fewer, every answer is the same item or nothing


@dataclass
class BuildReport:
    version: str
    path: Path
    ingest: IngestReport
    train: TrainResult
    index: IndexParams
    seconds: float
    promoted: bool = True
    warm_start_from: str | None = None
    gate: GateDecision | None = None
    pruned: list[str] = field(default_factory=list)


def _embedding_frame(
    ids: pl.Series, index_name: str, known: np.ndarray, emb: np.ndarray
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            index_name: np.arange(len(emb), dtype=np.uint32),
            ids.name: ids,
            "known": known,
            "embedding": emb.astype(np.float32),
        }
    )


def _save_curve(history: list[dict[str, Any]], path: Path, eval_k: int, validated: bool) -> None:
    """Loss per epoch, and validation recall where there was validation (without it the
    history holds the epoch number in its place)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    left.set(xlabel="epoch", ylabel="train loss")
    if validated:
        right = left.twinx()
        recall = [h[f"valid_recall@{eval_k}"] for h in history]
        right.plot(epochs, recall, "s-", color="tab:orange")
        right.set_ylabel(f"validation recall@{eval_k}")
    left.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(
    source: DataSource,
    root: Path,
    tower: TowerConfig | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    policy: RebuildPolicy | None = None,
    index_targets: IndexTargets | None = None,
    compute: Compute | None = None,
    inputs: Inputs | None = None,
    store: VersionStore | None = None,
    cluster: Cluster | None = None,
) -> BuildReport:
    """One build under the artifacts directory's lock; see the module docstring. `store`
    is the root's version store (default: a plain one; remote artifacts pass theirs);
    `cluster`: this is node 0 of a build over several machines."""
    with build_lock(root) as died:
        store = store or VersionStore(root)
        abandoned = store.discard_abandoned_staging()
        if died or abandoned:
            log.warning("cleaned up after a build that died: removed %s", abandoned or "nothing")
        return _build_locked(
            source,
            store,
            tower or TowerConfig(),
            config,
            progress,
            policy or RebuildPolicy(),
            index_targets or IndexTargets(),
            compute or Compute(),
            inputs or Inputs(),
            cluster,
        )


@dataclass
class WarmPlan:
    """Where a rebuild starts from: the current version's model directory (None: from
    scratch), the training settings with the warm budget filled in, and the towers (the
    lineage's number of members when the settings leave it to the log's size)."""

    config: TrainConfig
    tower: TowerConfig
    model_dir: Path | None = None
    from_version: str | None = None
    full_run_epochs: int | None = None  # of the last from-scratch run in the lineage


def plan_warm_start(
    previous: Path | None,
    features: FeatureSet,
    tower: TowerConfig,
    config: TrainConfig,
    policy: RebuildPolicy,
) -> WarmPlan:
    """Warm-start from the current version when its model fits the new data; the budget
    is then a third of the epochs its lineage's last full run took (early stopping
    included), so that it follows what this data set needs, not the example budget."""
    if previous is None or policy.from_scratch:
        why = "no current version" if previous is None else "--from-scratch"
        log.info("training from scratch: %s", why)
        return WarmPlan(config, tower)
    model_dir = VersionLayout(previous).model
    old = ModelSpec.from_dict(json.loads((model_dir / SPEC).read_text()))
    warm_tower = tower
    if tower.members is None:  # chosen by log size: keep the lineage's, which the weights have
        warm_tower = replace(tower, members=old.members)
    if tower.embedding_dim is None:  # likewise the width (versions before it: 64)
        warm_tower = replace(warm_tower, embedding_dim=old.tower.width)
    if tower.weighted_bags is None:  # chosen by the log: weights that appear need new bags
        warm_tower = replace(warm_tower, weighted_bags=weights_differ(features.interactions))
    problem = warm_start_problem(old, model_spec(features, warm_tower))
    if problem:
        log.warning("training from scratch: cannot warm-start from %s (%s)", previous.name, problem)
        return WarmPlan(config, tower)
    train = read_manifest(previous, verify=False).get("train", {})
    full_run_epochs = int(train.get("full_run_epochs") or train.get("epochs_run") or 1)
    if config.warm_epochs is None:
        config = replace(config, warm_epochs=warm_budget(full_run_epochs))
    log.info(
        "warm start from %s: its model fits this log; %s epoch(s) at most (its lineage's "
        "full run took %d)",
        previous.name,
        config.warm_epochs,
        full_run_epochs,
    )
    return WarmPlan(config, warm_tower, model_dir, previous.name, full_run_epochs)


@dataclass
class Embeddings:
    users: np.ndarray  # (users, D)
    items: np.ndarray  # (items, D)


def embed_version(
    layout: VersionLayout,
    features: FeatureSet,
    result: TrainResult,
    split: Split,
    branch: Spectral | None = None,
) -> Embeddings:
    """Every user's and item's embedding from the saved model, written beside it, with the
    spectral branch's part appended where the version has one (stored beside the model).
    IDs the model never trained (a split's validation-only users, before a refit) are
    marked unknown, so that serving falls back for them."""
    model = load_model(layout.model)
    builder = BatchBuilder(features, model.spec.tower)
    builder.mark_known(features.interactions if result.refitted else split.train)
    items = item_embeddings(model, builder, features.num_items)
    users = user_embeddings_now(model, builder, np.arange(features.num_users))
    if branch is not None:
        branch.save(layout.spectral)
        matrix = interaction_matrix(features.interactions, features.num_users, features.num_items)
        items = np.hstack([items, branch.item_rows])
        users = np.hstack([users, branch.users(matrix)])
    layout.embeddings.mkdir()
    for side, column, index, known, emb in (
        ("items", s.ITEM_ID, s.ITEM_IDX, builder.known_items, items),
        ("users", s.USER_ID, s.USER_IDX, builder.known_users, users),
    ):
        ids = pl.read_parquet(layout.vocabulary(column))["id"].rename(column)
        _embedding_frame(ids, index, known, emb).write_parquet(layout.side_embeddings(side))
        np.save(layout.side_matrix(side), np.ascontiguousarray(emb, dtype=np.float32))
    return Embeddings(users, items)


def refuse_non_finite(
    layout: VersionLayout, embeddings: Embeddings, metrics: dict[str, float]
) -> None:
    """A version with a NaN or infinite number in its weights, embeddings or validation
    metrics is never committed, whatever a gate would say: it answers every request with
    `"score": null`. One line naming what was not finite."""
    found = []
    sides = (("user embeddings", embeddings.users), ("item embeddings", embeddings.items))
    for name, values in sides:
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            found.append(f"{bad:,} values of the {name}")
    with safe_open(str(layout.model_weights), framework="numpy") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is no mapping)
            bad = int(np.count_nonzero(~np.isfinite(weights.get_tensor(key))))
            if bad:
                found.append(f"{bad:,} values of {key}")
    found += [f"validation {k} = {v}" for k, v in metrics.items() if not np.isfinite(v)]
    if found:
        raise RecsysError(
            "refused to commit a version with numbers that are not finite: "
            + "; ".join(found[:5])
            + " (check the log's weights and the training settings)"
        )


def index_version(
    layout: VersionLayout,
    embeddings: Embeddings,
    tower: TowerConfig,
    targets: IndexTargets,
    seed: int,
    branched: bool = False,
) -> IndexParams:
    """The index over the item embeddings, chosen and tuned on a sample of user queries. The
    spectral branch's item rows differ in length, so a version with it is searched by
    inner product whatever the towers' similarity."""
    users = embeddings.users
    rng = np.random.default_rng(seed)
    sample = users[rng.choice(len(users), min(INDEX_QUERY_SAMPLE, len(users)), replace=False)]
    cosine = tower.similarity is Similarity.COSINE and not branched
    metric = "angular" if cosine else "dot"
    return build_index(embeddings.items, sample, layout.index, metric, targets, seed)


def _drop_stand_in_metrics(result: TrainResult, split: Split) -> bool:
    """Whether the split held validation events. Without them the trainer keeps the last
    epoch by letting the epoch number stand in for the watched metric; that number is no
    measurement, so neither the manifest nor the summary may report it."""
    if split.valid.is_empty():
        result.best_metrics = {}
        return False
    return True


def _manifest(
    settings: BuildConfig,
    ingest_report: IngestReport,
    result: TrainResult,
    index: IndexParams,
    plan: WarmPlan,
    gate: GateDecision | None,
    previous: Path | None,
) -> dict[str, Any]:
    compute = settings.compute
    return {
        "kind": "build",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embedding_dim": result.spec.tower.output_dim,
        "members": result.spec.members,
        "similarity": settings.tower.similarity.value,
        "index": asdict(index),
        "data": asdict(ingest_report),
        "train": {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "member_best_epochs": result.member_best_epochs or None,
            "seconds": round(result.seconds, 2),
            "seed": result.config.seed,
            # every rank of every node: one entry per rank in each table's sharding
            "ranks": max((len(per_rank) for per_rank in result.sharding.values()), default=1),
            "device": compute.device,
            "sharding": result.sharding,
            "valid_metrics": result.best_metrics,
            "warm_start_from": plan.from_version,
            "full_run_epochs": plan.full_run_epochs or result.epochs_run,
            "refit_epochs": result.refit_epochs,
        },
        "gate": asdict(gate) if gate else None,
        "previous_version": previous.name if previous else None,
        "settings": settings.to_dict(),  # as given; model/train_config.json: as resolved
        "ordering": {"ordering": ingest_report.ordering, "reason": ingest_report.ordering_reason},
        "events": result.config.events.describe(),
    }


def _posted_events_kept(previous: Path | None, posted: EventSnapshot) -> bool:
    """Whether every posted event the previous version read is posted still: only then
    may its cleaned rows stand in for the files it read (`features.reuse`), since they
    hold its posted events too, and pruned events must leave the next version."""
    before = VersionLayout(previous).posted_events if previous else None
    if before is None or not before.is_file():
        return True
    if posted.path is None:
        return False
    old, new = pl.scan_parquet(before), pl.scan_parquet(posted.path)
    columns = old.collect_schema().names()
    if columns != new.collect_schema().names():
        return False
    gone = old.join(new, on=columns, how="anti", nulls_equal=True).select(pl.len()).collect()
    return int(gone.item()) == 0


def shared_events() -> tuple[str, list[Event], str] | None:
    """Every event of the hosts' shared log (RECSYS_EVENT_LOG_URL), up to its newest entry
    now, and that entry's ID; None without one."""
    shared = EventLogSettings().open()
    if shared is None:
        return None
    stream = shared.events
    try:
        events, position = stream.read_after(START, upto=stream.last_id())
    except redis.RedisError as exc:
        raise RecsysError(f"cannot read the shared event log ({exc})") from exc
    log.info("read %d events from the shared log %s", len(events), stream.key)
    return STREAM_MARK, events, position


def shared_changes() -> list[ItemChange]:
    """Every catalogue change of the hosts' shared log (empty without one)."""
    shared = EventLogSettings().open()
    if shared is None:
        return []
    try:
        return shared.catalogue.read_after(START)[0]
    except redis.RedisError as exc:
        raise RecsysError(f"cannot read the shared catalogue changes ({exc})") from exc


def stage(name: str, started: float) -> None:
    """One plain line per finished stage, for operators who read a build's log, not a
    terminal (cron, a scheduler)."""
    log.info("stage %s done: %.1f s since the build started", name, time.perf_counter() - started)


def log_ingest(report: IngestReport) -> None:
    """What ingest read, kept and refused, and why, in plain lines."""
    log.info(
        "ingest: read %d rows from %d file(s), kept %d, rejected %d, duplicates %d; "
        "%d users, %d items (%d new users, %d new items); ordering %s (%s)",
        report.read,
        report.files,
        report.kept,
        report.rejected,
        report.duplicates,
        report.users,
        report.items,
        report.new_users,
        report.new_items,
        report.ordering,
        report.ordering_reason,
    )
    for reason, count in sorted(report.rejects_by_reason.items(), key=lambda kv: -kv[1]):
        log.info("ingest: rejected %d row(s): %s", count, reason)
    for table, summary in report.side_tables.items():
        log.info("ingest: %s table: %s", table, json.dumps(summary, default=str))


def _build_locked(
    source: DataSource,
    store: VersionStore,
    tower: TowerConfig,
    config: TrainConfig | None,
    progress: bool,
    policy: RebuildPolicy,
    index_targets: IndexTargets,
    compute: Compute,
    inputs: Inputs,
    cluster: Cluster | None = None,
) -> BuildReport:
    """The stages in order, each writing into the staging directory; any failure
    discards it and leaves `current` as it was."""
    started = time.perf_counter()
    previous = store.current() if store.current_name() else None
    name, staging = store.stage()
    layout = VersionLayout(staging)
    settings = BuildConfig(tower, config or TrainConfig(), index_targets, policy, compute, inputs)
    try:
        posted = EventSnapshot(None, {}, 0)
        if inputs.posted_events:
            posted = snapshot(
                events_dir(store.root), layout.posted_events, source.columns, shared_events()
            )
        if posted.path is not None:
            source = replace(source, interactions=(*source.interactions, posted.path))
            log.info("read %d posted events from %s", posted.rows, events_dir(store.root))
        items = merged_item_table(
            changes_path(store.root),
            source.items,
            layout.catalogue_items,
            source.columns,
            shared=shared_changes(),
        )
        if items is not None:  # items given features through the service join the table
            source = replace(source, items=items)
        ingest_report = ingest(
            source,
            layout.data,
            FeatureConfig(event_weights=dict(settings.train.event_weights)),
            previous=VersionLayout(previous).data if previous else None,
            volatile=frozenset({str(posted.path)} if posted.path else ()),
            reuse=_posted_events_kept(previous, posted),
        )
        log_ingest(ingest_report)
        stage("ingest", started)
        features = FeatureSet.load(layout.data)
        if features.num_items < MIN_ITEMS:
            raise RecsysError(
                f"nothing to recommend: the log holds {features.num_items} distinct item(s) "
                f"after cleaning ({ingest_report.kept} of {ingest_report.read} rows kept); "
                f"a version needs at least {MIN_ITEMS}"
            )
        split = build_split(features, settings.train)
        plan = plan_warm_start(previous, features, tower, settings.train, policy)
        result = fit_model(
            layout.data,
            features,
            split,
            layout.model,
            plan.tower,
            plan.config,
            nproc=compute.nproc,
            device=compute.device,
            warm_start=plan.model_dir,
            progress=progress,
            cluster=cluster,
        )
        stage("fit", started)
        has_validation = _drop_stand_in_metrics(result, split)
        layout.build_config.write_text(settings.to_toml())
        curve = layout.model / "training_curve.png"
        _save_curve(result.history, curve, result.config.eval_k, has_validation)
        branch = choose_spectral(
            features, split, load_model(layout.model, validated=True), result.config
        )
        stage("spectral", started)
        embeddings = embed_version(layout, features, result, split, branch.branch)
        refuse_non_finite(layout, embeddings, result.best_metrics or {})
        stage("embed", started)
        index = index_version(
            layout,
            embeddings,
            tower,
            index_targets,
            result.config.seed,
            branched=branch.branch is not None,
        )
        stage("index", started)
        gate = None
        if previous is not None and policy.gate:
            validated = load_model(layout.model, validated=True)
            gate = _gate(previous, validated, features, split, result.config, policy.gate_margin)
            log.warning("quality gate: %s", gate.reason)
            stage("gate", started)
        manifest = _manifest(settings, ingest_report, result, index, plan, gate, previous)
        manifest["spectral"] = branch.to_dict()
        manifest["posted_events"] = posted.rows
        manifest["events_absorbed"] = posted.absorbed
        store.commit(name, staging, manifest)
        stage("commit", started)
    except BaseException:
        store.discard(staging)
        raise
    promoted = gate is None or gate.promoted
    if promoted:
        store.promote(name)
        stage("promote", started)
    return BuildReport(
        name,
        store.versions / name,
        ingest_report,
        result,
        index,
        time.perf_counter() - started,
        promoted=promoted,
        warm_start_from=plan.from_version,
        gate=gate,
        pruned=store.prune(policy.keep_versions),
    )


RECENT_VERSIONS = 3  # versions that served lately (the current one included) the gate asks


def _recent_versions(previous: Path) -> list[Path]:
    """Versions beside `previous` that served (promoted, or a first build), newest first."""
    served = VersionStore(previous.parent.parent).served()
    return [previous.parent / n for n in reversed(served) if n != previous.name][
        : RECENT_VERSIONS - 1
    ]


def _gate(
    previous: Path,
    model: TwoTower,
    features: FeatureSet,
    split: Split,
    config: TrainConfig,
    margin: float,
) -> GateDecision:
    """All versions see each user's training events and are asked for the held-out ones."""
    seen = features.restricted_to(split.train)
    builder = BatchBuilder(seen, model.spec.tower)
    builder.mark_known(split.train)
    candidate = TowerScorer(model, builder, features.num_items)

    def scorer(version: Path) -> TowerScorer:
        old_model, old_builder = version_towers(version, seen, validated=True)
        return TowerScorer(
            old_model, old_builder, old_model.spec.num_items, catalogue=features.num_items
        )

    try:
        current = scorer(previous)
    except ArtifactError as exc:
        return not_comparable(
            f"current version {previous.name} is not comparable ({exc}); not promoted "
            "(--no-gate promotes without comparing)"
        )
    recent = {}
    for version in _recent_versions(previous):
        try:
            recent[version.name] = scorer(version)
        except ArtifactError as exc:  # built from other features: no common ground
            log.info("quality gate: %s left out (%s)", version.name, exc)
    return quality_gate(
        candidate,
        (previous.name, current),
        seen,
        split.valid,
        last_timestamp(previous),
        margin,
        metric=f"recall@{config.eval_k}",
        max_users=config.max_valid_users,
        seed=config.seed,
        recent=recent,
    )


def version_scorer(version_dir: Path, features: FeatureSet, validated: bool = False) -> TowerScorer:
    """A scorer with a built version's towers and its ID/feature masks."""
    model, builder = version_towers(version_dir, features, validated)
    return TowerScorer(model, builder, features.num_items)


def evaluate_version(version_dir: Path) -> dict[str, float]:
    """Full-ranking metrics of a version on its validation split (each user's last event
    in a sequence, a share of each validation user's items in a set)."""
    from training.evaluate import eval_task, evaluate

    layout = VersionLayout(version_dir)
    features = FeatureSet.load(layout.data)
    config = TrainConfig.from_dict(json.loads((layout.model / TRAIN_CONFIG).read_text()))
    split = build_split(features, config)
    seen = features.restricted_to(split.train)
    scorer = version_scorer(version_dir, seen, validated=True)
    return evaluate(scorer, eval_task(split.valid, seen.histories))
