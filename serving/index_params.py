"""What a version's index build measured and chose, as stored beside the index."""

import enum
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recsys.core.errors import ArtifactError

PARAMS_FILE = "index.json"


@dataclass(frozen=True)
class HnswParams:
    connectivity: int
    expansion_add: int
    expansion_search: int  # candidate list while searching (ef); a search for n > ef uses n
    recall_at_100: float  # measured against exact search at build time
    query_ms: float  # mean time of one k = 100 query at these settings, re-scoring included
    build_seconds: float


@dataclass(frozen=True)
class PqParams:
    subspaces: int  # 4-bit sub-quantisers each item's codes hold
    candidates: int  # the best of the scan re-scored exactly (a search for n > it uses n)
    recall_at_100: float  # measured against exact search at build time
    query_ms: float  # mean time of one k = 100 query at these settings, re-scoring included
    build_seconds: float


@dataclass(frozen=True)
class IndexParams:
    metric: str  # "angular" or "dot"
    dim: int
    n_trees: int
    search_k: int
    recall_at_100: float  # measured against exact search at build time
    build_seconds: float
    query_ms: float = 0.0  # mean time of one k = 100 query at these settings, at build time
    exact_query_ms: float = 0.0  # the same for exact search over the same embeddings
    backend: str = "annoy"  # what serves: "exact" (recall 1.0), "annoy", "hnsw" or "pq"
    hnsw: HnswParams | None = None  # the graph's measurements, where one was built
    pq: PqParams | None = None  # the PQ scan's, where one was built
    reason: str = ""  # why `backend` serves, in the measured figures

    @property
    def serving_query_ms(self) -> float:
        """What one k = 100 search of the serving backend took at build time."""
        if self.backend == "exact":
            return self.exact_query_ms
        if self.backend == "hnsw" and self.hnsw is not None:
            return self.hnsw.query_ms
        if self.backend == "pq" and self.pq is not None:
            return self.pq.query_ms
        return self.query_ms

    @property
    def serving_recall_at_100(self) -> float:
        """The serving backend's recall@100 against exact search, as measured."""
        if self.backend == "exact":
            return 1.0
        if self.backend == "hnsw" and self.hnsw is not None:
            return self.hnsw.recall_at_100
        if self.backend == "pq" and self.pq is not None:
            return self.pq.recall_at_100
        return self.recall_at_100

    @property
    def build_seconds_total(self) -> float:
        """Seconds spent building the Annoy index, the graph and the PQ codes (each may be
        absent)."""
        extra = [p.build_seconds for p in (self.hnsw, self.pq) if p is not None]
        return self.build_seconds + sum(extra)

    @classmethod
    def read(cls, directory: Path) -> "IndexParams":
        try:
            payload: dict[str, Any] = json.loads((directory / PARAMS_FILE).read_text())
            hnsw = payload.pop("hnsw", None)
            pq = payload.pop("pq", None)
            return cls(
                **payload,
                hnsw=HnswParams(**hnsw) if hnsw else None,
                pq=PqParams(**pq) if pq else None,
            )
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{directory}: cannot read index parameters ({exc})") from exc

    def write(self, directory: Path) -> None:
        (directory / PARAMS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


class IndexBackend(enum.Enum):
    AUTO = "auto"  # the cheapest that meets the recall target within the query budget
    ANNOY = "annoy"
    HNSW = "hnsw"
    PQ = "pq"
    EXACT = "exact"
