"""Generated logs: ingest either succeeds with counts that add up and every valid row
present, or fails with a clear error; it never loses a valid row."""

import tempfile
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.ingest import INTERACTIONS_FILE, REJECTS_FILE, ingest, load_vocabularies
from features.sources import resolve_source
from recsys.core.errors import RecsysError

text_ids = st.one_of(st.none(), st.text(min_size=0, max_size=6))
int_ids = st.one_of(st.none(), st.integers(-(2**62), 2**62))
rows = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 5), st.one_of(st.none(), st.integers(0, 3))),
    max_size=25,
)


# What Polars' strip_chars() removes: Unicode White_Space. Python's str.strip() also
# removes the separators \x1c-\x1f, which are not white space to Polars (nor Unicode).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
WHITE_SPACE += "\u2028\u2029\u202f\u205f\u3000"


def stripped(value: object) -> str:
    return str(value).strip(WHITE_SPACE)


def expected_valid(users: list, items: list, stamps: list) -> set[tuple]:
    return {
        (u, i, t)
        for u, i, t in zip(users, items, stamps, strict=True)
        if u is not None and i is not None and t is not None and stripped(u) and stripped(i)
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    rows,
    st.sampled_from(["parquet", "csv"]),
    st.sampled_from(["int", "text"]),
)
def test_ingest_never_loses_a_valid_row(data, shape, fmt, id_kind):
    ids = int_ids if id_kind == "int" else text_ids
    pool_users = data.draw(st.lists(ids, min_size=6, max_size=6))
    pool_items = data.draw(st.lists(ids, min_size=6, max_size=6))
    users = [pool_users[u] for u, _, _ in shape]
    items = [pool_items[i] for _, i, _ in shape]
    stamps = [t for _, _, t in shape]
    frame = pl.DataFrame(
        {"user_id": users, "item_id": items, "timestamp": stamps},
        schema={
            "user_id": pl.Int64 if id_kind == "int" else pl.String,
            "item_id": pl.Int64 if id_kind == "int" else pl.String,
            "timestamp": pl.Int64,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"log.{fmt}"
        if fmt == "csv":
            frame.write_csv(path)
        else:
            frame.write_parquet(path)
        try:
            report = ingest(resolve_source(path), Path(tmp) / "out")
        except RecsysError as exc:
            assert "no valid interactions" in str(exc) or "empty" in str(exc)
            return
        out = Path(tmp) / "out"
        rejected = pl.read_parquet(out / REJECTS_FILE).height
        assert report.read == len(shape) == report.kept + report.rejected + report.duplicates
        assert report.rejected == rejected
        vocabs = load_vocabularies(out)
        clean = pl.read_parquet(out / INTERACTIONS_FILE)
        got = {
            (str(vocabs["user_id"].ids[u]), str(vocabs["item_id"].ids[i]), t)
            for u, i, t in clean.select("user_idx", "item_idx", "timestamp").iter_rows()
        }
        # CSV cannot tell an empty string from a missing value, and IDs are stripped.
        want = {(stripped(u), stripped(i), t) for u, i, t in expected_valid(users, items, stamps)}
        assert got == want
        assert report.kept == len(want)
