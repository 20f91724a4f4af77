"""Request and response bodies of the HTTP API (they document it in the OpenAPI schema).
Floats must be finite: JSON's NaN and Infinity extensions are refused with a 422.

JSON's true and false are never read as 1 and 0, nor text as a boolean: pydantic's lax
mode would answer user 1 for `"user_id": true` and store `"available": "yes"` as true,
while /v1/events (recsys.core.ids) refuses both. A whole number written as a float
(`"k": 2.0`) is still read as that integer, as it always was."""

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from recsys.core.ids import MAX_TEXT_CHARS

ItemId = int | str


def _not_boolean(expected: str) -> BeforeValidator:
    """A validator that refuses true and false where `expected` says what belongs."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError("boolean_refused", expected + ", not a boolean")
        return value

    return BeforeValidator(check)


RequestId = Annotated[ItemId, _not_boolean("an ID must be an integer or a string")]
Count = Annotated[int, _not_boolean("must be an integer")]


def query_flag(value: Any) -> Any:
    """A boolean query parameter is `true` or `false` (any case): "yes", "on" or "1" are
    not read as a flag."""
    text = value.lower() if isinstance(value, str) else value
    if text not in ("true", "false"):
        raise PydanticCustomError("bool_parsing", "must be true or false")
    return text == "true"


def add_filter(filters: dict[str, list[str]], column: str, values: Iterable[Any]) -> None:
    """Add a column's values to `filters`, column and values stripped, so that a query
    string and a JSON body name the same filter; ValueError for an empty or overlong
    column name or a boolean value."""
    name = column.strip()
    if not name:
        raise ValueError("a category filter needs a column name, not an empty one")
    if len(name) > MAX_TEXT_CHARS:
        raise ValueError(f"a category column name is at most {MAX_TEXT_CHARS} characters")
    kept = filters.setdefault(name, [])
    for value in values:
        if isinstance(value, bool):
            raise ValueError(f"category {name!r}: values are text, not a boolean")
        kept.append(str(value).strip())


class ScoredItem(BaseModel):
    item_id: ItemId
    score: float


class Recommendations(BaseModel):
    model_version: str
    user_id: ItemId | None = None
    items: list[ScoredItem]
    cached: bool = Field(description="True when the answer came from the cache")
    fallback: bool = Field(
        default=False, description="True when the user is unknown: popular items"
    )
    unknown_items: list[ItemId] = Field(
        default_factory=list, description="History or exclude IDs not in the catalogue, ignored"
    )


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    user_id: RequestId | None = None
    history: list[RequestId] = Field(
        default_factory=list, max_length=1000, description="Recent item IDs, oldest first"
    )
    k: Count = Field(10, ge=1, description="At most RECSYS_MAX_K (1,000 by default)")
    exclude: list[RequestId] = Field(default_factory=list, max_length=10_000)
    categories: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Filters: an item qualifies if, for every column named, it has one of "
        'the values given ({"genre": ["Comedy", "Drama"]})',
    )

    @field_validator("categories", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return value
        filters: dict[str, list[str]] = {}
        for column, values in value.items():
            add_filter(filters, column, values if isinstance(values, list) else [values])
        return filters

    @model_validator(mode="after")
    def _needs_someone(self) -> "RecommendationRequest":
        if self.user_id is None and not self.history:
            raise ValueError("give a user_id, a history of item IDs, or both")
        return self


class SimilarItems(BaseModel):
    model_version: str
    item_id: ItemId
    items: list[ScoredItem]
    cached: bool


class Reloaded(BaseModel):
    model_version: str | None
    previous_version: str | None
    switched: bool


MAX_EVENTS_PER_REQUEST = 1000


class EventBatch(BaseModel):
    events: list[Any] = Field(
        min_length=1,
        max_length=MAX_EVENTS_PER_REQUEST,
        description="Objects with user_id and item_id, and optionally timestamp (seconds or "
        "ISO-8601; absent: the time of receipt), weight and event; each row is checked alone",
    )


class RejectedEvent(BaseModel):
    index: int
    reason: str


class EventsAccepted(BaseModel):
    accepted: int = Field(description="Events stored durably (fsync'd) before this answer")
    rejected: list[RejectedEvent]


class ItemUpdate(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    available: StrictBool = Field(description="False hides the item from every route")
    features: dict[str, Any] | None = Field(
        default=None,
        description="A new item's features, column -> value or [values], as in the item "
        "table; it is embedded by the item tower from them",
    )


class ItemUpdated(BaseModel):
    item_id: ItemId
    available: bool
    new: bool = Field(description="True when the version does not know the item")
    generation: int = Field(description="Catalogue changes applied by this worker")
