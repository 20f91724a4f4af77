"""Model and training settings: typed, bounded sections (`recsys.core.typed_settings`)
with defaults next to the code that uses them, resolved against the data (sizes that
scale with it) and written into each version."""

import enum
import math
from dataclasses import asdict, replace
from typing import Any, Literal, TypeVar, get_args

from pydantic import field_validator

from features.events import EventRule, parse_event_weights
from recsys.core.ids import MAX_WEIGHT
from recsys.core.typed_settings import described, number, settings_section, switch, whole


class Similarity(enum.Enum):
    COSINE = "cosine"  # L2-normalised towers; the index uses the angular metric
    DOT = "dot"  # raw dot product; the index uses an inner-product augmentation


MAX_MEMBERS = 8
USER_SUMMED = 3  # inputs the user tower's skip path sums: user ID, history, recent bags
AUTO_MEMBERS = 4  # the most `members` a log gets by default
MAX_WIDTH = 4096  # the widest table or layer a setting may ask for
SERVED_WIDTH = 256  # a default build's served vector: members x embedding_dim
BASE_WIDTH = 64  # the narrowest default member (and every version's before the rule)
TABLE_PARAMETERS = 1 << 26  # ID rows x width a default build widens its tables up to
ENSEMBLE_EVENTS = 1_000_000  # below this many training events, members = this // events
TABLE_STEP = 4  # FBGEMM's kernels need every embedding table's width to be a multiple of 4
EvalCutoff = Literal[10, 20, 50, 100]  # the K of each metric validation measures
EVAL_CUTOFFS: tuple[int, ...] = get_args(EvalCutoff)


@settings_section
class TowerConfig:
    """Shape of both towers."""

    embedding_dim: int | None = whole(
        None,
        1,
        MAX_WIDTH,
        "output size of each member's towers, a multiple of 4; unset: by the log",
        multiple_of=TABLE_STEP,
    )  # (`member_width`): a large log's one tower as wide as a small log's ensemble
    id_dim: int = whole(
        0, 0, MAX_WIDTH, "user/item ID table width, a multiple of 4; 0: embedding_dim", TABLE_STEP
    )
    feature_dim: int = whole(
        0, 0, MAX_WIDTH, "side-feature table width, a multiple of 4; 0: embedding_dim", TABLE_STEP
    )
    hidden_dim: int = whole(256, 0, MAX_WIDTH, "hidden layer width; 0: one linear map")
    skip: bool = switch(
        True, "add the pooled ID rows and history means to the MLP's output (a skip path)"
    )  # matrix factorisation's dot product, which the MLP corrects; needs id_dim ==
    # feature_dim == embedding_dim. False: the MLP alone (every version before it)
    history_length: int = whole(50, 1, 10_000, "items in the long history bag")
    recent_length: int = whole(5, 1, 10_000, "items in the short bag of the most recent")
    similarity: Similarity = described(Similarity.COSINE, "cosine or dot")
    id_dropout: float = number(
        0.1, 0.0, 1.0, "share of rows trained without their ID, for cold starts", ge=0.0, lt=1.0
    )
    dropout: float = number(
        0.2, 0.0, 1.0, "dropout on each tower's pooled inputs while training", ge=0.0, lt=1.0
    )  # slows the decline of validation recall after its peak (planted 300k-event log:
    # 0.43 -> 0.42 in three epochs with 0.2, against 0.43 -> 0.37 without); 0.2 over 0.1
    # with the skip path: test Recall@20 0.352 / 0.347 on MovieLens-100K, 0.156 / 0.151 on
    # check-ins
    members: int | None = whole(
        None, 1, MAX_MEMBERS, "towers trained side by side and averaged; unset: by log size"
    )  # a deep ensemble, served as one concatenated vector
    weighted_bags: bool | None = described(
        None,
        "bags average their items by event weight; unset: when the weights differ",
        strict=True,
    )  # a purchase counts more than a view in the user's history; False: plain means
    # (what equal weights amount to, and every earlier version's kernels)

    def __post_init__(self) -> None:
        if self.embedding_dim is None:
            # The width comes from the log later (`resolve`); the skip path would then
            # refuse any other table width, so say so now. Without it any width goes.
            if self.skip and (self.id_dim or self.feature_dim):
                raise ValueError(
                    "the skip path needs id_dim and feature_dim equal to embedding_dim: "
                    "set embedding_dim too, leave them at 0 (they follow it), or set "
                    "skip = false"
                )
        elif self.skip and not self.id_width == self.feature_width == self.embedding_dim:
            raise ValueError(
                "the skip path adds ID and item-feature rows to the output: id_dim and "
                "feature_dim must equal embedding_dim (or set skip = false)"
            )
        if self.recent_length > self.history_length:
            raise ValueError("recent_length must be at most history_length")

    def resolve(self, train_events: int, weighted: bool = False, id_rows: int = 0) -> "TowerConfig":
        """Fill `members`: small logs train several towers and average them, because their
        models differ most from one random start to another (MovieLens-100K without
        timestamps: Recall@20 0.341-0.346 for single seeds, 0.351 / 0.354 / 0.355 for
        averages of 2 / 3 / 4); from about a million events one tower is kept, so the
        cost per epoch never grows past what a million-event build's costs. Then fill
        `embedding_dim` (`member_width`: the members share a 256-d served vector), with
        `id_rows` the users plus items of the ID tables."""
        tower = self
        if tower.weighted_bags is None:
            tower = replace(tower, weighted_bags=weighted)
        if tower.members is None:
            members = min(AUTO_MEMBERS, max(1, ENSEMBLE_EVENTS // max(1, train_events)))
            tower = replace(tower, members=members)
        if tower.embedding_dim is None:
            width = member_width(tower.members or 1, id_rows)
            tower = replace(tower, embedding_dim=width)
        return tower

    # The widths in use: 0 stays in the settings (so a changed embedding_dim carries the
    # tables with it; resolved at construction, it left them at 64 and the skip path
    # refused `embedding_dim = 128`).
    @property
    def width(self) -> int:
        """Each member's output size (before `resolve`: as if for a small catalogue)."""
        return self.embedding_dim or member_width(self.members or 1)

    @property
    def id_width(self) -> int:
        return self.id_dim or self.width

    @property
    def feature_width(self) -> int:
        return self.feature_dim or self.width

    @property
    def output_dim(self) -> int:
        """Width of the served vectors (every member's embedding, concatenated)."""
        return self.width * (self.members or 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "similarity": self.similarity.value}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "TowerConfig":
        # Versions built before `members` and weighted bags existed: one tower, plain means.
        payload = {"members": 1, "weighted_bags": False, "skip": False, **payload}
        payload["similarity"] = Similarity(payload["similarity"])
        return cls(**payload)


def member_width(members: int, id_rows: int = 0) -> int:
    """A member's default width: its share of SERVED_WIDTH (one member 256, two 128, three
    80, four 64), narrowed towards BASE_WIDTH while the ID tables (`id_rows` users and
    items) would pass TABLE_PARAMETERS, so a million-item catalogue keeps 64-d rows and
    its index stays small and fast. Sparse check-in log, 300k events, one tower: Recall@20
    0.156 / 0.174 / 0.180 at 64 / 128 / 256 (rank, where EASE's full rank scores 0.217);
    MovieLens-100K 0.352 / 0.359."""
    width = SERVED_WIDTH // members // 16 * 16
    while width > BASE_WIDTH and id_rows * width * members > TABLE_PARAMETERS:
        width -= 16
    return max(BASE_WIDTH, width)


class LossKind(enum.Enum):
    SOFTMAX = "softmax"  # in-batch sampled softmax with logQ correction
    NPAIR = "npair"  # multi-class N-pair
    TRIPLET = "triplet"  # triplet margin with semi-hard in-batch mining


def parse_losses(specs: list[str]) -> tuple[tuple[LossKind, float], ...]:
    """["softmax", "triplet:0.5"] -> ((SOFTMAX, 1.0), (TRIPLET, 0.5))."""
    parsed = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            parsed.append((LossKind(name.strip()), float(weight) if weight else 1.0))
        except ValueError as exc:
            kinds = ", ".join(k.value for k in LossKind)
            raise ValueError(f"bad loss '{spec}': use NAME[:WEIGHT] with NAME in {kinds}") from exc
    return tuple(parsed)


def warm_budget(full_run_epochs: int) -> int:
    """Epochs of a warm-started rebuild: a third of what a full run took (or would take)."""
    return max(1, math.ceil(full_run_epochs / 3))


@settings_section
class TrainConfig:
    """Optimisation settings. Unset means "scale with the data" (see `resolve`)."""

    losses: tuple[tuple[LossKind, float], ...] = described(
        ((LossKind.SOFTMAX, 1.0),),
        "NAME[:WEIGHT] list of softmax, npair, triplet (summed; weights finite, > 0)",
    )
    # 0.1 and a logQ correction a little past full (1.2) measured best on MovieLens-100K
    # without timestamps (Recall@20 0.33-0.34 against 0.30-0.33 at 0.05 / 1.0) and on the
    # planted synthetic log; below 1.0 popular items are over-recommended (0.5: 0.25).
    temperature: float = number(0.1, 0, 100, "softmax temperature", gt=0.0, le=100.0)
    logq_correction: float = number(
        1.2, 0.0, 10.0, "strength of the popularity correction (0: none, 1: full)"
    )
    query_logq_correction: float = number(
        0.0, 0.0, 10.0, "the same correction for users, the item -> user direction's negatives"
    )  # Off: 1.0 measured Recall@20 +0.001 to +0.002 but NDCG@20 up to -0.001 on the
    # check-in logs, the reverse on MovieLens-100K (docs/quality.md)
    extra_negatives: int = whole(
        0, 0, 1 << 20, "uniformly sampled negatives per batch (mixed negative sampling)"
    )
    symmetric: bool = switch(
        True, "each positive item against every query of the batch too (item -> user softmax)"
    )  # test Recall@20 +0.004 on a 1M-event check-in log (0.1863 -> 0.1902), +0.003 at
    # 300k events; MovieLens-100K within noise, temporal HR@10 unchanged (docs/quality.md);
    # the loss's share of a step is in `make bench ONLY=speed` ("Parts of a training step")
    batch_size: int | None = whole(None, 1, 1 << 20, "examples per step; unset: by log size")
    max_epochs: int | None = whole(None, 1, 10_000, "epochs at most; unset: by example_budget")
    patience: int = whole(3, 1, 10_000, "epochs without validation improvement before stopping")
    learning_rate: float = number(2e-3, 0, 10, "dense parameters (AdamW)", gt=0.0, le=10.0)
    weight_decay: float = number(1e-4, 0.0, 10.0, "AdamW weight decay")
    embedding_learning_rate: float = number(
        0.05, 0, 10, "embedding rows (fused row-wise Adagrad)", gt=0.0, le=10.0
    )
    embedding_weight_decay: float = number(
        0.0, 0.0, 10.0, "L2 on the embedding rows a batch touches"
    )
    warmup_fraction: float = number(0.05, 0.0, 1.0, "share of steps with a rising rate")
    eval_k: EvalCutoff = described(
        20, "early stopping watches validation Recall@eval_k"
    )  # one of the cutoffs validation measures (training.evaluate)
    max_valid_users: int = whole(
        10_000, 1, 100_000_000, "validation users sampled for per-epoch evaluation"
    )
    refit: bool = switch(
        True, "after early stopping, retrain on every event for the best epochs"
    )  # where the epochs came from `example_budget` and that would pass it (a large log
    # that never stops early), the budget's last epoch continues on every event instead
    valid_share: float = number(
        0.2,
        0,
        1,
        "of each validation user's items, when time does not order the log",
        gt=0.0,
        lt=1.0,
    )
    spectral: bool = switch(
        True, "add the spectral branch (the graph's low-pass filter) where validation gains"
    )  # training.spectral: chosen on the validation split, kept only past a 1% gain
    example_budget: int = whole(
        6_000_000, 1, 10**12, "default epochs: about this many training examples"
    )  # a refit included: a sparse 1M-event log's 256-d tower runs ~110 s an epoch on 2 cores
    warm_epochs: int | None = whole(
        None, 1, 10_000, "epochs of a warm-started rebuild; unset: a third of a full run"
    )
    sharding: Literal["auto", "table_wise", "column_wise", "row_wise"] = described(
        "auto", "embedding tables over ranks: auto (the planner's choice); row_wise: GPUs only"
    )
    seed: int = whole(0, 0, 2**32 - 1, "seed of every random generator of a build")
    # What each event counts for (features.events): weights per event type, overriding the
    # weight column for the types named; the event types that are targets (empty: all).
    event_weights: dict[str, float] = described(
        {}, "weight per event type (0 to 1e6), over the log's weight column (TYPE=W,... or a table)"
    )
    target_events: tuple[str, ...] = described(
        (), "the event types that are training targets (empty: all)"
    )

    @field_validator("losses", mode="before")
    @classmethod
    def _losses_as_text(cls, value: Any) -> Any:
        """NAME[:WEIGHT] text (files, flags) or [[kind, weight]] pairs (manifests)."""
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list | tuple) and values and all(isinstance(v, str) for v in values):
            return parse_losses(list(values))
        return value

    @field_validator("eval_k", mode="before")
    @classmethod
    def _eval_k_whole(cls, value: Any) -> Any:
        """A whole number, as every count of the schema (20.0 and true are refused)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"Input should be one of {', '.join(map(str, EVAL_CUTOFFS))}")
        return value

    @field_validator("event_weights", mode="before")
    @classmethod
    def _weights_as_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_event_weights(value)
        if isinstance(value, dict) and any(
            isinstance(v, bool) or not isinstance(v, int | float) for v in value.values()
        ):
            raise ValueError("event_weights must map event types to numbers")
        return value

    @field_validator("target_events", mode="before")
    @classmethod
    def _targets_as_text(cls, value: Any) -> Any:
        names = value.split(",") if isinstance(value, str) else value
        if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
            return tuple(n.strip() for n in names if n.strip())
        return value

    def __post_init__(self) -> None:
        bad = [
            f"{kind.value}:{weight:g}" for kind, weight in self.losses if not 0 < weight < math.inf
        ]
        if not self.losses or bad:  # a NaN or infinite weight makes every step's loss NaN
            raise ValueError(
                "losses need at least one entry, each with a finite positive weight"
                + (f" (got {', '.join(bad)})" if bad else "")
            )
        if self.extra_negatives and LossKind.SOFTMAX not in {kind for kind, _ in self.losses}:
            raise ValueError(
                "extra_negatives feed the softmax loss only: add the softmax loss or drop them"
            )
        EventRule(dict(self.event_weights), tuple(self.target_events))  # checks the weights
        heavy = {k: v for k, v in self.event_weights.items() if v > MAX_WEIGHT}
        if heavy:  # ingest refuses such weights in a log; a loss on them is not finite
            raise ValueError(f"event_weights must be at most {MAX_WEIGHT:g}, got {heavy}")

    @property
    def events(self) -> EventRule:
        return EventRule(dict(self.event_weights), tuple(self.target_events))

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["losses"] = [[kind.value, weight] for kind, weight in self.losses]
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "TrainConfig":
        losses = tuple((LossKind(kind), float(weight)) for kind, weight in payload["losses"])
        targets = tuple(payload.get("target_events", ()))
        return cls(**{**payload, "losses": losses, "target_events": targets})

    def resolve(self, train_events: int, warm: bool = False) -> "TrainConfig":
        """Fill data-dependent defaults: batches grow with the log, epochs shrink; a
        warm-started run continues for `warm_epochs` (default a third of a full run)."""
        batch = self.batch_size or int(
            min(2048, max(256, 2 ** round(math.log2(train_events / 100))))
        )
        epochs = self.max_epochs or int(
            min(50, max(3, self.example_budget // max(1, train_events)))
        )
        if warm:
            epochs = self.warm_epochs or warm_budget(epochs)
        return replace(self, batch_size=batch, max_epochs=epochs)


Weight = TypeVar("Weight")  # a torch tensor, or a NumPy array in the service


def legacy_keys(state: dict[str, Weight]) -> dict[str, Weight]:
    """Weights saved before members existed (`user_mlp.*`) under today's names."""
    renamed = {}
    for key, value in state.items():
        for tower in ("user_mlp.", "item_mlp."):
            if key.startswith(tower):
                key = f"{tower[:-1]}s.0.{key.removeprefix(tower)}"
        renamed[key] = value
    return renamed
