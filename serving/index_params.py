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
class IndexParams:
    metric: str  # "angular" or "dot"
    dim: int
    n_trees: int
    search_k: int
    recall_at_100: float  # measured against exact search at build time
    build_seconds: float
    query_ms: float = 0.0  # mean time of one k = 100 query at these settings, at build time
    exact_query_ms: float = 0.0  # the same for exact search over the same embeddings
    backend: str = "annoy"  # what serves: "exact" (recall 1.0), "annoy" or "hnsw"
    hnsw: HnswParams | None = None  # the graph's measurements, where one was built
    reason: str = ""  # why `backend` serves, in the measured figures

    @property
    def serving_query_ms(self) -> float:
        """What one k = 100 search of the serving backend took at build time."""
        if self.backend == "exact":
            return self.exact_query_ms
        if self.backend == "hnsw" and self.hnsw is not None:
            return self.hnsw.query_ms
        return self.query_ms

    @property
    def serving_recall_at_100(self) -> float:
        """The serving backend's recall@100 against exact search, as measured."""
        if self.backend == "exact":
            return 1.0
        if self.backend == "hnsw" and self.hnsw is not None:
            return self.hnsw.recall_at_100
        return self.recall_at_100

    @property
    def build_seconds_total(self) -> float:
        """Seconds spent building the Annoy index and the graph (either may be absent)."""
        return self.build_seconds + (self.hnsw.build_seconds if self.hnsw else 0.0)

    @classmethod
    def read(cls, directory: Path) -> "IndexParams":
        try:
            payload: dict[str, Any] = json.loads((directory / PARAMS_FILE).read_text())
            hnsw = payload.pop("hnsw", None)
            return cls(**payload, hnsw=HnswParams(**hnsw) if hnsw else None)
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{directory}: cannot read index parameters ({exc})") from exc

    def write(self, directory: Path) -> None:
        (directory / PARAMS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


class IndexBackend(enum.Enum):
    AUTO = "auto"  # the cheapest that meets the recall target within the query budget
    ANNOY = "annoy"
    HNSW = "hnsw"
    EXACT = "exact"
