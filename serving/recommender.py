"""Top-k items for users from a built version: user embedding -> index -> drop seen items.
Shared by `recsys recommend` and the HTTP service, so both answer the same way."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from features.jagged import CsrBags
from recsys.core import schema as s
from recsys.core.errors import ArtifactError
from recsys.core.layout import VersionLayout
from recsys.core.versions import verify_version
from serving.index import Retriever, load_retriever

OVERFETCH = 1.5  # extra candidates beyond k + seen, since ANN may miss a few
FILTER_OVERFETCH = 4  # candidates beyond what the qualifying share alone would ask for
EXACT_SUBSET = 20_000  # items a filtered search scores exactly (~2.5 ms at 64 dimensions)
# Batch answers score every item exactly up to this catalogue size: a block of users times
# the item matrix is one matrix product, cheaper per user than an index query there, and
# exact where the index misses some of the true top items (see `for_users`).
EXACT_BATCH_ITEMS = 200_000
BLOCK_SCORES = 1 << 24  # user x item scores computed at once by a batch (64 MB of floats)


def _side(
    layout: VersionLayout, side: str, id_column: str, index: str
) -> tuple[pl.DataFrame, np.ndarray]:
    """One side's IDs, and its embeddings: the mapped matrix where the version has one
    (read-only, its pages shared by every worker), else the Parquet column (versions built
    before 2026-12-07), which each worker holds in its own memory."""
    matrix = layout.side_matrix(side)
    if not matrix.is_file():
        frame = pl.read_parquet(layout.side_embeddings(side))
        return frame, np.ascontiguousarray(frame["embedding"].to_numpy(), dtype=np.float32)
    frame = pl.read_parquet(layout.side_embeddings(side), columns=[id_column, index])
    try:
        emb = np.load(matrix, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{matrix}: not a readable matrix ({exc})") from exc
    if emb.ndim != 2 or emb.dtype != np.float32 or len(emb) != frame.height:
        raise ArtifactError(
            f"{matrix}: holds {emb.shape} {emb.dtype}, expected {frame.height} float32 rows"
        )
    return frame, emb


@dataclass
class Recommender:
    version: str
    user_ids: pl.Series
    item_ids: pl.Series
    user_emb: np.ndarray  # (U, D), users as of the end of the log
    item_emb: np.ndarray  # (I, D)
    seen: CsrBags  # per user_idx
    histories: CsrBags  # per user_idx: item_idx in the order the user tower reads them
    history_weights: np.ndarray  # (E,) the event weight of each item of `histories`
    popularity: np.ndarray  # (I,) event counts
    retriever: Retriever
    # Items by event count, most popular first (ties: lower index first), sorted once: an
    # argsort of 1M items per fallback request took 17-19 ms
    popularity_order: np.ndarray = field(init=False)
    hidden: np.ndarray | None = None  # (I,) bool: items batch answers leave out (see hide)

    def __post_init__(self) -> None:
        self.popularity_order = np.argsort(-self.popularity, kind="stable")

    def hide(self, raw_ids: list[str]) -> int:
        """Leave these items (raw IDs as text) out of batch answers, as the service does
        with items hidden through `PUT /admin/items`; how many the version knows."""
        mask = self.item_ids.cast(pl.String).is_in(pl.Series(raw_ids, dtype=pl.String))
        self.hidden = mask.to_numpy() if mask.any() else None
        return int(mask.sum())

    @classmethod
    def load(cls, version_dir: Path) -> "Recommender":
        manifest = verify_version(version_dir)
        layout = VersionLayout(version_dir)
        users, user_emb = _side(layout, "users", s.USER_ID, s.USER_IDX)
        items, item_emb = _side(layout, "items", s.ITEM_ID, s.ITEM_IDX)
        log = pl.read_parquet(layout.interactions, columns=[s.USER_IDX, s.ITEM_IDX, s.WEIGHT])
        counts = np.bincount(log[s.USER_IDX].to_numpy(), minlength=users.height)
        seen_lists = (
            log.group_by(s.USER_IDX)
            .agg(pl.col(s.ITEM_IDX).unique())
            .join(users.select(s.USER_IDX), on=s.USER_IDX, how="right")
            .sort(s.USER_IDX)
        )
        return cls(
            version=str(manifest["version"]),
            user_ids=users[s.USER_ID],
            item_ids=items[s.ITEM_ID],
            user_emb=user_emb,
            item_emb=item_emb,
            seen=CsrBags.from_lists(seen_lists[s.ITEM_IDX]),
            histories=CsrBags(  # ingest writes the log sorted by user, in history order
                np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                log[s.ITEM_IDX].to_numpy().astype(np.int64),
            ),
            history_weights=log[s.WEIGHT].fill_null(1.0).to_numpy().astype(np.float32),
            popularity=np.bincount(log[s.ITEM_IDX].to_numpy(), minlength=len(item_emb)).astype(
                np.float32
            ),
            retriever=load_retriever(layout.index, item_emb),
        )

    def user_index(self, raw_ids: pl.Series) -> pl.Series:
        """Dense index of each raw user ID (null for unknown users)."""
        lookup = pl.DataFrame(
            {s.USER_ID: self.user_ids, s.USER_IDX: np.arange(len(self.user_ids), dtype=np.uint32)}
        )
        frame = pl.DataFrame({s.USER_ID: raw_ids.cast(self.user_ids.dtype, strict=False)})
        return frame.join(lookup, on=s.USER_ID, how="left", maintain_order="left")[s.USER_IDX]

    def for_vector(
        self,
        query: np.ndarray,
        exclude: np.ndarray,
        k: int,
        hidden: np.ndarray | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best `k` items for a query vector, never returning `exclude` or `hidden` items
        (masks over the items) and only `allowed` ones. A filter that leaves few items
        scores them all exactly; otherwise the index is asked for more candidates until k
        pass (an exact search over everything once that would be as dear)."""
        n = len(self.item_emb)
        share = 1.0
        if allowed is not None:
            qualifying = int(np.count_nonzero(allowed))
            if qualifying <= EXACT_SUBSET:
                return self._exact(query, allowed, exclude, hidden, k)
            # Annoy's cost is its search_k, not how many candidates it returns (a graph's
            # grows once they pass its ef), so ask for plenty: neighbours share categories,
            # which a plain share misjudges.
            share = qualifying / n / FILTER_OVERFETCH
        wanted = int((k + len(exclude)) * OVERFETCH / share) + 1
        while True:
            ids, scores = self.retriever.search(query, min(wanted, n))
            keep = ~np.isin(ids, exclude)
            if hidden is not None:
                keep &= ~hidden[ids]
            if allowed is not None:
                keep &= allowed[ids]
            if np.count_nonzero(keep) >= k or len(ids) >= n:  # enough, or every item
                return ids[keep][:k], scores[keep][:k]
            if wanted >= min(n, EXACT_SUBSET):  # an index that misses the few items left
                break
            wanted *= 4
        return self._exact(query, allowed, exclude, hidden, k)

    def _exact(
        self,
        query: np.ndarray,
        allowed: np.ndarray | None,
        exclude: np.ndarray,
        hidden: np.ndarray | None,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        mask = np.ones(len(self.item_emb), dtype=bool) if allowed is None else allowed.copy()
        if hidden is not None:
            mask &= ~hidden
        mask[exclude[exclude < len(mask)]] = False
        candidates = np.flatnonzero(mask)
        _, top, scores = best_per_row((self.item_emb[candidates] @ query)[None], k)
        return candidates[top], scores

    def popular(
        self,
        exclude: np.ndarray,
        k: int,
        hidden: np.ndarray | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` most popular items not in `exclude` (nor hidden, and allowed): without
        masks only the first k + len(exclude) of the order can be needed."""
        order = self.popularity_order
        if hidden is None and allowed is None:
            head = order[: k + len(exclude)]
            order = head[~np.isin(head, exclude)][:k]
            return order, self.popularity[order]
        keep = np.ones(len(order), dtype=bool) if allowed is None else allowed.copy()
        if hidden is not None:
            keep &= ~hidden
        keep[exclude[exclude < len(keep)]] = False
        order = order[keep[order]][:k]
        return order, self.popularity[order]

    def for_users(self, user_idx: np.ndarray, k: int) -> pl.DataFrame:
        """Long-format table user_idx, item_idx, rank, score for known users. Catalogues up
        to EXACT_BATCH_ITEMS are scored exactly, a block of users at a time; larger ones go
        through the index one user at a time, as the service answers them."""
        if len(self.item_emb) <= EXACT_BATCH_ITEMS:
            parts = [self.exact_top_k(block, k) for block in user_blocks(user_idx, self.item_emb)]
        else:
            parts = []
            for u in user_idx.tolist():
                seen = self.seen.values[self.seen.offsets[u] : self.seen.offsets[u + 1]]
                ids, sc = self.for_vector(self.user_emb[u], seen, k, self.hidden)
                parts.append((np.full(len(ids), u, dtype=np.int64), ids, sc))
        if not parts:
            return pl.DataFrame(
                schema={
                    s.USER_IDX: pl.Int64,
                    s.ITEM_IDX: pl.Int64,
                    "rank": pl.Int64,
                    "score": pl.Float32,
                }
            )
        users = np.concatenate([p[0] for p in parts]).astype(np.int64)
        first = np.r_[True, users[1:] != users[:-1]]  # rows come grouped by user, best first
        starts = np.flatnonzero(first)
        ranks = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
        return pl.DataFrame(
            {
                s.USER_IDX: users,
                s.ITEM_IDX: np.concatenate([p[1] for p in parts]).astype(np.int64),
                "rank": ranks + 1,
                "score": np.concatenate([p[2] for p in parts]).astype(np.float32),
            }
        )

    def exact_top_k(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, score) rows of the best `k` unseen, unhidden items of each user,
        best first (ties: lower item index first), from one matrix product."""
        scores = self.user_emb[users] @ self.item_emb.T  # (B, I)
        seen, lengths = self.seen.gather(users)
        scores[np.repeat(np.arange(len(users)), lengths), seen] = -np.inf
        if self.hidden is not None:
            scores[:, self.hidden] = -np.inf
        rows, items, best = best_per_row(scores, k)
        return users[rows], items, best

    def for_unknown(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """What a user the version does not know gets, in every route and in batch: the
        most popular items (score = training event count)."""
        return self.popular(np.zeros(0, dtype=np.int64), k, self.hidden)

    def for_raw_users(self, wanted: pl.Series, k: int) -> tuple[pl.DataFrame, int]:
        """Long-format table user_id, item_id, rank, score for raw user IDs, unknown users
        given `for_unknown`; and how many users were known."""
        index = self.user_index(wanted)
        known = index.is_not_null().to_numpy()
        result = self.for_users(index.filter(index.is_not_null()).to_numpy().astype(np.int64), k)
        result = result.with_columns(
            self.user_ids.gather(result[s.USER_IDX]).alias(s.USER_ID),
            self.item_ids.gather(result[s.ITEM_IDX]).alias(s.ITEM_ID),
        )
        frames = [result.select(s.USER_ID, s.ITEM_ID, "rank", "score")]
        unknown = wanted.filter(~pl.Series(known))
        if len(unknown):
            top, counts = self.for_unknown(k)
            frames.append(
                pl.DataFrame(
                    {
                        s.USER_ID: np.repeat(unknown.cast(pl.String).to_numpy(), len(top)),
                        s.ITEM_ID: np.tile(self.item_ids.gather(top).to_numpy(), len(unknown)),
                        "rank": np.tile(np.arange(1, len(top) + 1), len(unknown)),
                        "score": np.tile(counts, len(unknown)).astype(np.float32),
                    }
                ).with_columns(pl.col(s.USER_ID).cast(self.user_ids.dtype, strict=False))
            )
        return pl.concat(frames, how="vertical_relaxed"), int(known.sum())


def best_per_row(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, score) of the best `k` finite scores of each row of (B, N) `scores`,
    row by row, best first (ties: lower column first); -inf marks what may not be chosen,
    so a row with fewer than k left gets fewer."""
    n = min(k, scores.shape[1])
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=scores.dtype)
    top = np.argpartition(-scores, n - 1, axis=1)[:, :n]  # (B, n), unordered
    values = np.take_along_axis(scores, top, axis=1).ravel()
    rows = np.repeat(np.arange(len(scores)), n)
    order = np.lexsort((top.ravel(), -values, rows))
    order = order[np.isfinite(values[order])]
    return rows[order], top.ravel()[order], values[order]


def user_blocks(user_idx: np.ndarray, item_emb: np.ndarray) -> list[np.ndarray]:
    """`user_idx` in blocks whose scores against every item fit in BLOCK_SCORES floats."""
    size = max(1, BLOCK_SCORES // max(1, len(item_emb)))
    return [user_idx[i : i + size] for i in range(0, len(user_idx), size)]
