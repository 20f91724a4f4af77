"""Where each part of a version lives: the one place that spells the file names inside a
version directory (every reader and writer asks a `VersionLayout`).

    <version>/manifest.json        written last, with a checksum of every other file
    <version>/data/                the ingested log (its own manifest, vocabularies, tables)
    <version>/model/               model.json, weights (and validated weights, row state)
    <version>/embeddings/          users.parquet, items.parquet (IDs, known, embedding);
                                   users.npy, items.npy (the matrices, mapped by workers)
    <version>/index/               the Annoy index and its parameters
    <version>/build_config.toml    the resolved settings the version was built with
    <version>/posted_events.parquet  the events posted to the service that it absorbed
    <version>/catalogue_items.parquet  the item table with the service's new items merged in
"""

from dataclasses import dataclass
from pathlib import Path

DATA = "data"
MODEL = "model"
EMBEDDINGS = "embeddings"
INDEX = "index"
BUILD_CONFIG = "build_config.toml"
POSTED_EVENTS = "posted_events.parquet"
CATALOGUE_ITEMS = "catalogue_items.parquet"
INTERACTIONS = "interactions.parquet"
VOCAB = "vocab"
MODEL_SPEC = "model.json"  # inside model/: the towers' shape
MODEL_WEIGHTS = "weights.safetensors"  # inside model/: the served weights
SPECTRAL = "spectral.safetensors"  # inside model/: the spectral branch, where chosen


@dataclass(frozen=True)
class VersionLayout:
    """Paths inside one version directory (staged or committed)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / DATA

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def embeddings(self) -> Path:
        return self.root / EMBEDDINGS

    @property
    def index(self) -> Path:
        return self.root / INDEX

    @property
    def build_config(self) -> Path:
        return self.root / BUILD_CONFIG

    @property
    def posted_events(self) -> Path:
        return self.root / POSTED_EVENTS

    @property
    def catalogue_items(self) -> Path:
        return self.root / CATALOGUE_ITEMS

    @property
    def model_spec(self) -> Path:
        return self.model / MODEL_SPEC

    @property
    def model_weights(self) -> Path:
        return self.model / MODEL_WEIGHTS

    @property
    def spectral(self) -> Path:
        return self.model / SPECTRAL

    def side_embeddings(self, side: str) -> Path:
        """`side` is "users" or "items"."""
        return self.embeddings / f"{side}.parquet"

    def side_matrix(self, side: str) -> Path:
        """The same embeddings as one float32 matrix (row = index), which every service
        worker maps and shares instead of reading the Parquet column into its own memory."""
        return self.embeddings / f"{side}.npy"

    @property
    def interactions(self) -> Path:
        return self.data / INTERACTIONS

    def table(self, side: str) -> Path:
        """The ingested side table ("users" or "items"), when the build had one."""
        return self.data / f"{side}.parquet"

    def side_features(self, side: str) -> Path:
        """The ingested feature bags of "users" or "items", when the build had a table."""
        return self.data / f"{side[:-1]}_features.parquet"

    def side_vocabulary(self, side: str, column: str) -> Path:
        """Category text -> index of one feature `column` of "items" or "users"."""
        return self.data / VOCAB / side / f"{column}.parquet"

    def vocabulary(self, column: str) -> Path:
        """Raw ID -> dense index of `column` ("user_id" or "item_id")."""
        return self.data / VOCAB / f"{column}.parquet"
