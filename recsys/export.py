"""A version's user or item embeddings out, for a vector store or an analysis of one's own:
`recsys export`. IDs keep the log's type (integers stay integers), row i of the vectors is
ID i, and the similarity the version is served with goes with them: its index's metric,
which is the dot product whenever a spectral branch widens the vectors, whatever the
towers were trained for (a cosine search of such vectors ranks otherwise than the service)."""

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.core import schema as s
from recsys.core.artifacts import atomic_path, write_parquet
from recsys.core.errors import RecsysError
from recsys.core.layout import VersionLayout
from recsys.core.versions import verify_version


class Side(StrEnum):
    users = "users"
    items = "items"


INDEX_SIMILARITY = {"angular": "cosine", "dot": "dot"}  # index metric -> search by


def served_similarity(manifest: dict[str, Any]) -> str:
    """What the service ranks this version's vectors by: the metric its index was built
    with (`recsys.pipeline.index_version` chose it), else the towers' similarity."""
    metric = manifest.get("index", {}).get("metric")
    return INDEX_SIMILARITY.get(metric, str(manifest.get("similarity", "dot")))


class ExportFormat(StrEnum):
    parquet = "parquet"  # one file: the ID column and `embedding` (fixed-size float32 list)
    npy = "npy"  # the (N, D) float32 matrix, and its IDs beside it in `<name>.ids.npy`


@dataclass(frozen=True)
class Exported:
    rows: int
    dim: int
    similarity: str
    files: list[Path]


def ids_path(out: Path) -> Path:
    """Where the IDs of an npy export go: `items.npy` -> `items.ids.npy`."""
    return out.with_name(f"{out.stem}.ids.npy")


def export_embeddings(version_dir: Path, side: Side, fmt: ExportFormat, out: Path) -> Exported:
    """Write the version's `side` embeddings to `out` (its checksums verified first); each
    file is written whole or not at all (a failed export leaves nothing half-written under
    its name)."""
    manifest = verify_version(version_dir)
    layout = VersionLayout(version_dir)
    id_column = s.USER_ID if side is Side.users else s.ITEM_ID
    frame = pl.read_parquet(layout.side_embeddings(side.value), columns=[id_column, "embedding"])
    similarity = served_similarity(manifest)
    vectors = np.ascontiguousarray(frame["embedding"].to_numpy(), dtype=np.float32)
    if out.is_dir():
        raise RecsysError(f"{out} is a directory: name the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt is ExportFormat.parquet:
        write_parquet(frame, out)
        files = [out]
    else:
        ids = frame[id_column].to_numpy()
        if ids.dtype == object:  # text IDs: fixed-width Unicode, which loads without pickle
            ids = ids.astype(str)
        _write_npy(vectors, out)
        _write_npy(ids, ids_path(out))
        files = [out, ids_path(out)]
    dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    return Exported(frame.height, dim, similarity, files)


def _write_npy(array: np.ndarray, target: Path) -> None:
    with atomic_path(target) as tmp, tmp.open("wb") as handle:
        np.save(handle, array, allow_pickle=False)
