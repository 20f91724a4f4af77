"""Request and response bodies of the HTTP API (they document it in the OpenAPI schema).
Floats must be finite: JSON's NaN and Infinity extensions are refused with a 422."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ItemId = int | str


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

    user_id: ItemId | None = None
    history: list[ItemId] = Field(
        default_factory=list, max_length=1000, description="Recent item IDs, oldest first"
    )
    k: int = Field(10, ge=1, description="At most RECSYS_MAX_K (1,000 by default)")
    exclude: list[ItemId] = Field(default_factory=list, max_length=10_000)
    categories: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Filters: an item qualifies if, for every column named, it has one of "
        'the values given ({"genre": ["Comedy", "Drama"]})',
    )

    @field_validator("categories", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in value.items()
            }
        return value

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

    available: bool = Field(description="False hides the item from every route")
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
