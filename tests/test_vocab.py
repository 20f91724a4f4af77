"""Vocabularies: dense, deterministic, and stable when extended."""

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.vocab import Vocabulary
from recsys.core.errors import DataValidationError

ids = st.lists(st.integers(-(2**40), 2**40), max_size=50)


@given(ids, ids)
def test_extend_keeps_known_indices_and_appends_only_new_ids(first, second):
    before = Vocabulary.build("item_id", pl.Series(first, dtype=pl.Int64))
    after = before.extend(pl.Series(second, dtype=pl.Int64))
    assert after.ids.head(len(before)).equals(before.ids)
    assert after.ids.n_unique() == len(after) == len(set(first) | set(second))
    assert after.ids.slice(len(before)).to_list() == sorted(set(second) - set(first))


@given(st.lists(st.text(min_size=1, max_size=5), max_size=30))
def test_build_is_deterministic_whatever_the_input_order(values):
    forward = Vocabulary.build("user_id", pl.Series(values, dtype=pl.String))
    backward = Vocabulary.build("user_id", pl.Series(values[::-1], dtype=pl.String))
    assert forward.ids.equals(backward.ids)


def test_round_trip_through_parquet(tmp_path):
    vocab = Vocabulary.build("user_id", pl.Series(["b", "a", "c"]))
    vocab.save(tmp_path / "v.parquet")
    assert Vocabulary.load("user_id", tmp_path / "v.parquet").ids.to_list() == ["a", "b", "c"]


def test_a_file_that_is_not_a_vocabulary_is_refused(tmp_path):
    pl.DataFrame({"id": [1, 2], "index": [0, 5]}).write_parquet(tmp_path / "v.parquet")
    with pytest.raises(DataValidationError, match="not a vocabulary"):
        Vocabulary.load("user_id", tmp_path / "v.parquet")
