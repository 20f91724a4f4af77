"""Interaction logs on object storage: `--data s3://bucket/logs/` (or `gs://`, `file://`,
a glob such as `s3://bucket/logs/date=2026-12-*/*.parquet`) names a Parquet data set,
hive-partitioned or not. The files are listed through fsspec and each one is read in place,
lazily, by Polars' own cloud reader (only the columns and row groups a query needs travel;
nothing is downloaded whole first). Endpoint and credentials come from the standard
variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...; for GCS, Google's defaults), as
for artifacts on object storage.

Each file's size and ETag go into the ingest manifest, so that a rebuild can tell whether
it reads the same inputs."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.core.errors import DataValidationError, RecsysError

PARQUET_SUFFIXES = (".parquet", ".pq")
GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class RemoteFile:
    """One object of a remote log: enough of `pathlib.Path`'s surface (name, stem, suffix,
    str) for the code that reads logs, plus what identifies its content."""

    url: str
    size: int
    etag: str

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind(".") :] if "." in name else ""

    @property
    def stem(self) -> str:
        return self.name[: len(self.name) - len(self.suffix)]

    def __str__(self) -> str:
        return self.url

    def described(self) -> dict[str, Any]:
        return {"url": self.url, "size": self.size, "etag": self.etag}


LogFile = Path | RemoteFile  # a local file, or an object read in place


def is_remote_log(data: object) -> bool:
    return "://" in str(data)


def list_remote_log(url: str) -> list[RemoteFile]:
    """The Parquet files a URL names: one object, every object under a prefix (hidden
    and `_`-prefixed marker files such as `_SUCCESS` left out), or a glob's matches;
    sorted by URL, so the order never depends on how the store lists."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        protocol = url.split("://", 1)[0]
        if GLOB_CHARACTERS & set(path):
            found = fs.glob(path, detail=True)
        elif fs.isfile(path):
            found = {path: fs.info(path)}
        else:
            found = fs.find(path, detail=True)
    except (OSError, ValueError, ImportError) as exc:
        raise RecsysError(f"{url}: cannot list the log ({type(exc).__name__}: {exc})") from exc
    files = []
    for key, info in sorted(found.items()):
        name = key.rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "directory" or name.startswith((".", "_")):
            continue
        remote = RemoteFile(f"{protocol}://{key}", int(info.get("size") or 0), _etag(info))
        if remote.suffix.lower() not in PARQUET_SUFFIXES:
            raise DataValidationError(
                remote,
                None,
                "a log on object storage is read in place as Parquet; convert CSV to "
                "Parquet, or copy it to a local path",
            )
        files.append(remote)
    if not files:
        raise RecsysError(f"{url}: no Parquet interaction files found")
    return files


def _etag(info: dict[str, Any]) -> str:
    """S3's ETag, GCS's generation or ETag, a local file's modification time."""
    for key in ("ETag", "etag", "generation", "mtime", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""
