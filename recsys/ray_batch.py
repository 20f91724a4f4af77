"""Batch answers on Ray Data: `recsys recommend --engine ray`. The users are split into
batches over a pool of actors; each actor loads the version once (the NumPy towers and the
exact or index search of the one-process path: `Recommender.for_raw_users`), so the lists
are the ones `recsys recommend` writes, as partitioned Parquet under `--out` (a directory
here, or s3://, gs:// on a cluster).

Ray is an optional extra (`pip install 'recsys[ray]'`). Without `--address` a Ray of this
machine's cores is started for the job; with one (`ray://HEAD:10001` or `auto`), the job
runs on that cluster, whose nodes need this package and the artifacts (object storage, or
one path on every node)."""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from recsys.core import schema as s
from recsys.core.errors import RecsysError

INSTALL_HINT = "Ray is not installed: pip install 'recsys[ray]' (or make setup)"
BATCHES_PER_ACTOR = 4  # a slow batch holds up at most a quarter of an actor's share


@dataclass(frozen=True)
class RayRun:
    users: int
    actors: int
    seconds: float  # the scoring and writing, Ray's start-up excluded
    out: str


class Scorer:
    """One actor: the version loaded once, then `Recommender.for_raw_users` per batch."""

    def __init__(
        self, artifacts: str, cache_dir: str | None, version: str, k: int, hidden: list[str]
    ) -> None:
        from recsys.core.versions import VersionStore
        from recsys.remote_artifacts import readable_root
        from serving.recommender import Recommender

        root = readable_root(artifacts, Path(cache_dir) if cache_dir else None, [version])
        self.rec = Recommender.load(VersionStore(root).versions / version)
        self.rec.hide(hidden)
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        table, _ = self.rec.for_raw_users(frame[s.USER_ID], self.k)
        return table.to_arrow()


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise RecsysError(INSTALL_HINT) from None
    return ray


def recommend_on_ray(
    artifacts: str,
    cache_dir: Path | None,
    version: str,
    wanted: pl.Series,
    hidden: list[str],
    k: int,
    out: str,
    address: str | None = None,
    cpus: int | None = None,
) -> RayRun:
    """Score `wanted` (raw user IDs) with the named version on Ray and write Parquet parts
    under `out`; one actor per CPU of the cluster (or `cpus` on a local one)."""
    ray = ray_module()
    if not _is_url(out):
        out = str(Path(out).resolve())  # the actors do not share this process's directory
    _check_empty(out)
    if not _is_url(artifacts):
        artifacts = str(Path(artifacts).resolve())
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            num_cpus=cpus if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
        batch = max(1, math.ceil(len(wanted) / (actors * BATCHES_PER_ACTOR)))
        started = time.perf_counter()
        answers = ray.data.from_arrow(pa.table({s.USER_ID: wanted.to_arrow()})).map_batches(
            Scorer,
            fn_constructor_args=(
                artifacts,
                str(cache_dir) if cache_dir else None,
                version,
                k,
                hidden,
            ),
            batch_size=batch,
            batch_format="pyarrow",
            concurrency=actors,
            num_cpus=1,
        )
        answers.write_parquet(out)
        return RayRun(len(wanted), actors, time.perf_counter() - started, out)
    finally:
        if started_here:
            ray.shutdown()


def _check_empty(out: str) -> None:
    """Parts are added beside whatever a directory holds: a second job into a used one
    would mix two answers, so only a new or empty directory is written."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if fs.isfile(path):
        raise RecsysError(f"{out} is a file: --engine ray writes a directory of parts")
    if fs.isdir(path) and fs.ls(path):
        raise RecsysError(f"{out} holds files already: name a new or empty directory")


def _is_url(path: str) -> bool:
    return "://" in path
