"""Column names and dtypes shared by every stage, so no stage re-declares them."""

import polars as pl

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
WEIGHT = "weight"
EVENT = "event"

REQUIRED_COLUMNS = (USER_ID, ITEM_ID)
OPTIONAL_COLUMNS = (TIMESTAMP, WEIGHT, EVENT)

# Dense indices produced by the vocabularies.
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
INDEX_DTYPE = pl.UInt32

# Columns of the cleaned interactions table written by ingest, in this order,
# sorted by (user_idx, timestamp, input order).
CLEAN_SCHEMA: dict[str, pl.DataType] = {
    USER_IDX: pl.UInt32(),
    ITEM_IDX: pl.UInt32(),
    TIMESTAMP: pl.Int64(),
    WEIGHT: pl.Float32(),
    EVENT: pl.String(),
}

# Columns of the rejects table: where the row came from, why it was refused, and its
# raw values rendered as text so that nothing about it is lost.
REJECT_SCHEMA: dict[str, pl.DataType] = {
    "file": pl.String(),
    "row": pl.UInt64(),
    "reason": pl.String(),
    USER_ID: pl.String(),
    ITEM_ID: pl.String(),
    TIMESTAMP: pl.String(),
    WEIGHT: pl.String(),
}

ID_DTYPES = (pl.Int64, pl.String)
