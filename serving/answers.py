"""What the service answers, free of HTTP: look a request up, search on a cache miss, and
shape the answer. This module owns every cache key (each carries the model version, so a
new version never reads an old one's entries).

Which code runs where: `for_user` and `similar` are coroutines for the event loop (a
lookup and a Redis round trip bounded by its millisecond timeout; a thread-pool hop would
cost more than a cache hit); only a miss on a version with slow searches goes to the
search threads. `for_request` may run the user tower and is called from a thread.
"""

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.catalogue_log import (
    MAX_VALUES,
    ItemChange,
    append_change,
    cell,
    changes_path,
    typed_value,
    value_text,
)
from features.event_log import EventStoreError, SegmentWriter
from features.event_stream import EventStream
from recsys.core.ids import IdError, checked_id, checked_text
from serving.cache import CACHE_EVENTS, Cache, pack_results, unpack_results
from serving.catalogue import FilterError, Filters
from serving.event_rows import parse_events
from serving.fresh import UserEvents
from serving.live import LiveVersion
from serving.metrics import CATALOGUE_CHANGES, EVENTS, INDEX_SECONDS
from serving.rendered import CACHE_HITS, RenderedAnswers, RequestKey, render_json
from serving.schemas import ItemId, RecommendationRequest
from serving.state import VersionState

Search = Callable[[], tuple[np.ndarray, np.ndarray]]  # a retrieval to run on a cache miss
Found = tuple[np.ndarray, np.ndarray, bool]  # items, scores, cached
Answer = dict[str, object]


class AnswerError(Exception):
    """A request that cannot be answered; `status` is the HTTP status it maps to."""

    status = 400


class NotReady(AnswerError):
    status = 503


class UnknownItem(AnswerError):
    status = 404


class Invalid(AnswerError):
    status = 422


class Unstored(AnswerError):
    """The disk did not take a write whole: nothing of it is acknowledged."""

    status = 507


def _feature_texts(features: dict[str, Any], columns: dict[str, Any]) -> dict[str, list[str]]:
    """A PUT's features as the text stored for them, each value checked against the type
    the version's item table holds its column in (`columns`: column -> CategoryColumn), as
    every build reads it back; Invalid saying which column, type and value, and why."""
    if not features:
        raise Invalid("features must name at least one column of the item table")
    unknown = sorted(set(features) - set(columns))
    if unknown:
        shown = ", ".join(ascii(c)[1:-1][:40] for c in unknown)
        raise Invalid(
            f"unknown feature column(s) {shown}; the item table's: "
            f"{', '.join(sorted(columns)) or 'none'}"
        )
    out = {c: _column_texts(c, v, columns[c].dtype) for c, v in features.items()}
    if not any(out.values()):
        raise Invalid("features must give at least one value")
    return out


def _column_texts(column: str, value: Any, dtype: Any) -> list[str]:
    """One column's values (a value or a list; nulls left out) as stored text."""
    values = [one for one in (value if isinstance(value, list) else [value]) if one is not None]
    if len(values) > MAX_VALUES:
        raise Invalid(f"feature {column}: at most {MAX_VALUES} values")
    texts = []
    for one in values:
        if isinstance(one, float) and not math.isfinite(one):
            raise Invalid(f"feature {column}: numbers must be finite")
        if not isinstance(one, str | int | float | bool):
            raise Invalid(f"feature {column}: values are text, numbers or booleans")
        try:
            if isinstance(one, str):
                one = checked_text(one, f"feature {column}")
            texts.append(checked_text(value_text(typed_value(column, one, dtype)), column))
        except (IdError, ValueError) as exc:
            raise Invalid(str(exc)) from None
    try:  # the cell a build writes: a column of one value takes one
        cell(column, texts, dtype, "|")
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return texts


def history_query(
    state: VersionState, user: int | None, items: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """The user tower on a history of item indices (oldest first), in which items added
    since the version (indices past its item count) count through their item-tower
    vectors: a new item has no row in the tower's item table, and its vector is where the
    version's space places it (the one its `similar` searches from). Their mean is mixed
    in by their share of the history; a history of new items alone is that mean."""
    added = items >= len(state.items)
    if not added.any():
        return state.embed_history(user, items.tolist(), _listed(weights))
    mean = state.catalogue.vectors(items[added]).mean(axis=0)  # (D,)
    share = float(added.mean())
    if share == 1.0:
        return mean.astype(np.float32)
    kept = ~added
    base = state.embed_history(
        user, items[kept].tolist(), None if weights is None else _listed(weights[kept])
    )
    return ((1.0 - share) * base + share * mean).astype(np.float32)


def _listed(weights: np.ndarray | None) -> list[float] | None:
    return None if weights is None else weights.tolist()


def _fresh_query(
    state: VersionState, user: int | None, fresh: UserEvents, half: float
) -> tuple[np.ndarray, np.ndarray]:
    """(query vector, new item indices) for a user with events newer than the version.

    The user tower on the version's history of the user plus the new events (weighted as
    the version weighs its bags; items the version does not know are left out), mixed
    with the tower's vector of the new events alone, the way an anonymous session is
    answered, with weight n / (n + half) for n new events. Why the mix: a known user's
    vector is mostly their ID row and long history, so ten new events barely moved it (on
    MovieLens-100K, 10 horror events left the horror share of user 1's top 20 at 0.00);
    recent actions should count most, and more of them count more."""
    pairs = zip(fresh.items, fresh.weights, strict=True)
    mapped = [(state.catalogue.index_of(raw), w) for raw, w in pairs]
    new = np.array([i for i, _ in mapped if i is not None], np.int64)
    new_weights = np.array([w for i, w in mapped if i is not None], np.float32)
    nothing = np.zeros(0, np.int64)
    past, past_weights = state.history(user) if user is not None else (nothing, nothing)
    query = history_query(
        state,
        user,
        np.concatenate([past, new]),
        np.concatenate([past_weights, new_weights]).astype(np.float32),
    )
    if user is None or not len(new):
        return query, new  # an unknown user is answered from the new events alone
    recent = history_query(state, None, new, new_weights)  # (D,)
    share = len(new) / (len(new) + half)
    return ((1.0 - share) * query + share * recent).astype(np.float32), new


FOCUS_WINDOW = 20  # the most recent new events that name the user's current interest
FOCUS_SHARE = 0.5  # of the list's share n / (n + half), kept for that interest


def fresh_search(
    state: VersionState,
    query: np.ndarray,
    new: np.ndarray,
    exclude: np.ndarray,
    k: int,
    filters: Filters,
    half: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The best k items for a fresh query, with room kept for what the new events share.

    Where most of the user's latest events share a category of the catalogue (a genre,
    a shelf: `Catalogue.shared_category`), round(k * FOCUS_SHARE * n / (n + half)) places
    go to the query's best items of that category (ten events of one genre: 7 of 20).
    Why: the mixed query alone moved a long-standing user's list by the model's item
    similarity, which a log without time barely ties to genres (MovieLens-100K as a set:
    10 events of a genre absent from the top 20 gave it 0.03 of the next 20, and user 1
    on the log with timestamps 0.00). Every score stays the model's score for the query;
    the quota only decides which items are listed."""
    found = state.search(query, exclude, k, filters)
    recent = new[-FOCUS_WINDOW:]
    focus = {c: v for c, v in state.catalogue.shared_category(recent).items() if c not in filters}
    places = round(k * FOCUS_SHARE * len(recent) / (len(recent) + half))
    if not focus or places < 1:
        return found
    focused_ids, focused_scores = state.search(query, exclude, places, {**filters, **focus})
    ids, scores = found
    rest = ~np.isin(ids, focused_ids)
    ids = np.concatenate([focused_ids, ids[rest][: k - len(focused_ids)]])
    scores = np.concatenate([focused_scores, scores[rest][: k - len(focused_ids)]])
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def filter_tag(filters: Filters) -> str:
    """The part of a cache key that names the filters ("" without any)."""
    if not filters:
        return ""
    canonical = json.dumps({c: sorted(v) for c, v in sorted(filters.items())})
    return ":f" + hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


# `scope` is the version and its catalogue generation (VersionState.scope): an answer cached
# before a version switch or a catalogue change is never read after it.
def user_key(scope: str, user: int, k: int, exclude_seen: bool, filters: Filters) -> str:
    return f"recsys:{scope}:user:{user}:{k}:{int(exclude_seen)}{filter_tag(filters)}"


def fresh_key(
    scope: str, user: str, sequence: int, k: int, exclude_seen: bool, filters: Filters
) -> str:
    """A user with events newer than the version: the sequence number of their last event
    is in the key, so an answer cached before an event is never served after it."""
    digest = hashlib.blake2b(user.encode(), digest_size=12).hexdigest()
    tail = f"{k}:{int(exclude_seen)}{filter_tag(filters)}"
    return f"recsys:{scope}:fresh:{digest}:{sequence}:{tail}"


def popular_key(scope: str, k: int, filters: Filters) -> str:
    return f"recsys:{scope}:popular:{k}{filter_tag(filters)}"


def similar_key(scope: str, item: int, k: int, filters: Filters) -> str:
    return f"recsys:{scope}:similar:{item}:{k}{filter_tag(filters)}"


def query_key(scope: str, query: np.ndarray, banned: np.ndarray, k: int, filters: Filters) -> str:
    digest = hashlib.blake2b(query.tobytes() + banned.tobytes(), digest_size=12).hexdigest()
    return f"recsys:{scope}:query:{digest}:{k}{filter_tag(filters)}"


CACHE_MISSES = CACHE_EVENTS.labels("miss")
CACHE_PREFIX = "recsys:"  # of every key above: what a flush deletes


def _scored(state: VersionState, items: np.ndarray, scores: np.ndarray) -> list[Answer]:
    return [
        {"item_id": i, "score": s}
        for i, s in zip(state.item_ids(items), scores.astype(float).tolist(), strict=True)
    ]


def _recommendations(
    state: VersionState,
    user_id: ItemId | None,
    found: Found,
    fallback: bool = False,
    unknown_items: list[ItemId] | None = None,
) -> Answer:
    items, scores, cached = found
    return {
        "model_version": state.version,
        "user_id": user_id,
        "items": _scored(state, items, scores),
        "cached": cached,
        "fallback": fallback,
        "unknown_items": unknown_items or [],
    }


@dataclass
class Answers:
    live: LiveVersion
    events: SegmentWriter | EventStream  # this worker's segment, or the hosts' shared log
    artifacts: Path  # where the catalogue changes are kept
    cache: Cache
    ttl_seconds: int
    search_threads: ThreadPoolExecutor
    offload_search_ms: float  # misses of versions whose searches take this long: threads
    max_k: int
    max_history: int  # longest history a request may give
    max_new_items: int = 10_000  # new items held between builds (RECSYS_MAX_NEW_ITEMS)
    fresh_half_events: float = 5.0  # RECSYS_FRESH_HALF_EVENTS: see _fresh_query
    rendered: RenderedAnswers = field(default_factory=lambda: RenderedAnswers(0, 0.0))

    def current(self) -> VersionState:
        """The version a request uses from start to end (read once: see serving.live)."""
        state = self.live.state
        if state is None:
            raise NotReady("no model loaded yet")
        return state

    def _lookup(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        hit = self.cache.get(key)
        (CACHE_MISSES if hit is None else CACHE_HITS).inc()
        return None if hit is None else unpack_results(hit)

    def _store(self, key: str, items: np.ndarray, scores: np.ndarray) -> None:
        self.cache.set(key, pack_results(items, scores), self.ttl_seconds)

    @staticmethod
    def _timed(search: Search) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        found = search()
        INDEX_SECONDS.observe(time.perf_counter() - started)
        return found

    def cached(self, key: str, search: Search) -> Found:
        """A lookup for callers already off the event loop."""
        hit = self._lookup(key)
        if hit is not None:
            return *hit, True
        items, scores = self._timed(search)
        self._store(key, items, scores)
        return items, scores, False

    async def cached_on_loop(
        self, state: VersionState, key: str, search: Search, offload: bool = False
    ) -> Found:
        """A hit is answered on the loop. A miss on a version whose searches are slow
        searches in the search threads: Annoy and NumPy release the GIL while they search,
        so the loop keeps answering hits meanwhile. Faster searches run on the loop:
        handing the GIL back and forth cost more than it saved at 2 ms per search.
        `offload`: the miss runs the user tower (a user with posted events), whose cost
        grows with the events, so it never runs on the loop."""
        hit = self._lookup(key)
        if hit is not None:
            return *hit, True
        if offload or state.search_ms >= self.offload_search_ms:
            loop = asyncio.get_running_loop()
            items, scores = await loop.run_in_executor(self.search_threads, self._timed, search)
        else:
            items, scores = self._timed(search)
        self._store(key, items, scores)
        return items, scores, False

    def _user_search(
        self, state: VersionState, raw_user: ItemId, k: int, exclude_seen: bool, filters: Filters
    ) -> tuple[str, Search, bool]:
        """(cache key, search, fallback): an unknown user gets the most popular items, and a
        user with events newer than the version the user tower on their whole history."""
        user_id = state.user_key(raw_user)
        user = state.users.index(user_id)
        rec = state.recommender
        fresh = state.fresh_events(user_id)
        if fresh is not None:
            return self._fresh_search(state, raw_user, user, fresh, k, exclude_seen, filters)
        nothing = np.zeros(0, np.int64)
        if user is None:
            key = popular_key(state.scope, k, filters)
            return key, lambda: state.popular(nothing, k, filters), True
        key = user_key(state.scope, user, k, exclude_seen, filters)

        def search() -> tuple[np.ndarray, np.ndarray]:
            exclude = state.seen(user) if exclude_seen else nothing
            return state.search(rec.user_emb[user], exclude, k, filters)

        return key, search, False

    def _fresh_search(
        self,
        state: VersionState,
        raw_user: ItemId,
        user: int | None,
        fresh: UserEvents,
        k: int,
        exclude_seen: bool,
        filters: Filters,
    ) -> tuple[str, Search, bool]:
        """The user tower on the version's history plus the new events (items the version
        does not know are left out); the new items count as seen. Only the key is made
        before the cache is asked: a hit needs nothing else."""
        key = fresh_key(
            state.scope, str(state.user_key(raw_user)), fresh.sequence, k, exclude_seen, filters
        )
        if user is None and all(state.catalogue.index_of(raw) is None for raw in fresh.items):
            return key, lambda: state.popular(np.zeros(0, np.int64), k, filters), True

        def search() -> tuple[np.ndarray, np.ndarray]:
            half = self.fresh_half_events
            query, new = _fresh_query(state, user, fresh, half)
            seen = state.seen(user) if user is not None else np.zeros(0, np.int64)
            exclude = np.unique(np.concatenate([seen, new])) if exclude_seen else new[:0]
            return fresh_search(state, query, new, exclude, k, filters, half)

        return key, search, False

    def _checked(self, state: VersionState, filters: Filters) -> Filters:
        if not filters:
            return filters
        try:
            state.catalogue.check(filters)
        except FilterError as exc:
            raise Invalid(str(exc)) from exc
        return filters

    async def for_user(
        self, raw_user: ItemId, k: int, exclude_seen: bool, filters: Filters | None = None
    ) -> Answer:
        """Top-k for a user ID (event loop)."""
        return await self._for_user(self.current(), raw_user, k, exclude_seen, filters)

    async def user_body(
        self,
        asked: RequestKey,
        raw_user: ItemId,
        k: int,
        exclude_seen: bool,
        filters: Filters | None = None,
    ) -> bytes:
        """`for_user`, rendered; the bytes of a cache hit are kept for the identical request
        (`asked`) in this worker (serving.rendered). The scope and the user's event
        sequence are read before the answer is made: a change meanwhile makes the entry
        stale at once rather than a stale answer fresh."""
        state = self.current()
        scope, user = state.scope, str(state.user_key(raw_user))
        sequence = state.fresh.sequence_of(user)
        answer = await self._for_user(state, raw_user, k, exclude_seen, filters)
        body = render_json(answer)
        if answer["cached"]:
            self.rendered.keep(asked, scope, user, sequence, body)
        return body

    async def _for_user(
        self,
        state: VersionState,
        raw_user: ItemId,
        k: int,
        exclude_seen: bool,
        filters: Filters | None,
    ) -> Answer:
        filters = self._checked(state, filters or {})
        key, search, fallback = self._user_search(state, raw_user, k, exclude_seen, filters)
        fresh = ":fresh:" in key  # the tower runs on a miss: off the loop
        found = await self.cached_on_loop(state, key, search, offload=fresh)
        return _recommendations(state, state.user_key(raw_user), found, fallback)

    def for_request(self, body: RecommendationRequest) -> Answer:
        """Top-k for a user, a session history, or both (a thread: may run the tower)."""
        state = self.current()
        filters = self._checked(state, body.categories)
        if body.k > self.max_k:
            raise Invalid(f"k must be at most {self.max_k}")
        if len(body.history) > self.max_history:
            raise Invalid(f"history holds {len(body.history)} items; at most {self.max_history}")
        index_of = state.catalogue.index_of  # the version's items and the ones added since
        unknown = [i for i in [*body.history, *body.exclude] if index_of(i) is None]
        if not body.history and not body.exclude and body.user_id is not None:
            key, search, fallback = self._user_search(state, body.user_id, body.k, True, filters)
            found = self.cached(key, search)
            return _recommendations(state, state.user_key(body.user_id), found, fallback)
        user = None if body.user_id is None else state.user_index(body.user_id)
        history = [h for i in body.history if (h := index_of(i)) is not None]
        excluded = [e for i in body.exclude if (e := index_of(i)) is not None]
        rec = state.recommender
        seen = state.seen(user) if user is not None else np.zeros(0, np.int64)
        fresh = None if body.user_id is None else state.fresh_events(state.user_key(body.user_id))
        fresh_query, new = (
            (None, seen[:0])
            if fresh is None
            else _fresh_query(state, user, fresh, self.fresh_half_events)
        )
        banned = np.unique(np.concatenate([np.asarray(history + excluded, np.int64), seen, new]))
        if history:  # a session: the request's history is the user's recent past
            query = history_query(state, user, np.asarray(history, np.int64))
        elif fresh_query is not None and (user is not None or len(new)):
            query = fresh_query  # the user's events since the version count
        elif user is not None:
            query = rec.user_emb[user]
        else:
            items, scores = state.popular(banned, body.k, filters)
            found = (items, scores, False)
            return _recommendations(state, body.user_id, found, True, unknown)
        key = query_key(state.scope, query, banned, body.k, filters)
        if query is fresh_query:  # the user's events since the version: room for them
            half = self.fresh_half_events

            def search() -> tuple[np.ndarray, np.ndarray]:
                return fresh_search(state, query, new, banned, body.k, filters, half)

            found = self.cached(key + ":focus", search)
        else:
            found = self.cached(key, lambda: state.search(query, banned, body.k, filters))
        return _recommendations(state, body.user_id, found, unknown_items=unknown)

    def post_events(self, rows: list[Any]) -> Answer:
        """Validate events row by row and store the good ones durably (fsync'd) before
        answering (a thread: the fsync blocks); this worker's next answers include them."""
        state = self.current()
        accepted, rejected = parse_events(
            rows,
            state.users.integer,
            state.items.integer,
        )
        if accepted:
            try:
                stored = self.events.append(accepted)
            except EventStoreError as exc:
                EVENTS.labels("unstored").inc(len(accepted))
                raise Unstored(f"no event of this request was stored: {exc}") from exc
            if isinstance(stored, Path):
                state.fresh.read(stored)  # this worker's segment
            else:
                state.fresh.read_stream()  # the shared log, up to this entry and past it
        EVENTS.labels("accepted").inc(len(accepted))
        EVENTS.labels("rejected").inc(len(rejected))
        return {"accepted": len(accepted), "rejected": rejected}

    def change_item(
        self, raw_item: ItemId, available: bool, features: dict[str, Any] | None
    ) -> Answer:
        """Hide, show or add an item (a thread: the fsync blocks); durable before the
        answer, on this worker at once and on the others within a poll. Everything is
        checked before a byte is stored: the ID by the events route's rules, every feature
        value (printable text, finite numbers, at most MAX_VALUES a column)."""
        state = self.current()
        shelf = state.catalogue
        try:
            key = checked_id(raw_item, "item_id", state.items.integer)
        except IdError as exc:
            raise Invalid(str(exc)) from None
        known = state.item_index(key) is not None
        text = None if features is None else _feature_texts(features, shelf.columns)
        if not known and text is None and str(key) not in shelf.new_items and available:
            raise Invalid("a new item needs features: the item tower embeds it from them")
        adding = not known and text is not None and str(key) not in shelf.new_items
        if adding and len(shelf.new_items) >= self.max_new_items:
            raise Invalid(
                f"{len(shelf.new_items):,} new items are held since the version was "
                f"built (RECSYS_MAX_NEW_ITEMS): build a version to take them in"
            )
        change = ItemChange(key, available, text, time.time())
        try:
            if shelf.stream is not None:
                shelf.stream.append(change)
            else:
                append_change(changes_path(self.artifacts), change)
        except OSError as exc:
            raise Unstored(f"the change was not stored: {exc}") from exc
        CATALOGUE_CHANGES.labels(
            "added" if not known and text else "shown" if available else "hidden"
        ).inc()
        shelf.poll()
        return {
            "item_id": key,
            "available": available,
            "new": not known,
            "generation": shelf.generation,
        }

    async def similar(self, raw_item: ItemId, k: int, filters: Filters | None = None) -> Answer:
        """Nearest items to an item, the item itself excluded (event loop); a new item's
        neighbours from its features' vector."""
        state = self.current()
        filters = self._checked(state, filters or {})
        shelf = state.catalogue
        item = state.item_index(raw_item)
        if item is not None and shelf.hidden[item]:
            item = None  # hidden from every route
        if item is None:
            new = shelf.new_items.get(str(state.new_item_key(str(raw_item))))
            if new is None or not new.available:
                raise UnknownItem(f"unknown item_id {raw_item!r}")
            items, scores = state.search(new.embedding, np.zeros(0, np.int64), k + 1, filters)
            own = state.new_item_key(new.raw)  # an int in a catalogue of integers
            keep = np.array([i != own for i in state.item_ids(items)], dtype=bool)
            found: Found = (items[keep][:k], scores[keep][:k], False)
            answer_id: ItemId = state.new_item_key(new.raw)
        else:
            rec = state.recommender
            found = await self.cached_on_loop(
                state,
                similar_key(state.scope, item, k, filters),
                lambda: state.search(rec.item_emb[item], np.array([item]), k, filters),
            )
            answer_id = state.item_ids(np.array([item]))[0]
        items, scores, cached = found
        return {
            "model_version": state.version,
            "item_id": answer_id,
            "items": _scored(state, items, scores),
            "cached": cached,
        }
