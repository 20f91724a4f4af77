"""What keeps a version switch from stalling requests (up to 1.2 s at a 1M-item switch;
measured by `make bench ONLY=swap`): array-backed lookups (serving.ids, serving.weights)
that give the same answers as the dicts and the safetensors reader they replaced, and a
loading thread at the lowest priority."""

import numpy as np
import polars as pl
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file
from safetensors.torch import save_file

from serving.ids import IdLookup
from serving.weights import mapped_tensors


@given(st.lists(st.integers(-(2**63), 2**63 - 1), unique=True, max_size=50), st.integers())
def test_integer_ids_map_both_ways(ids, probe):
    lookup = IdLookup(pl.Series(ids, dtype=pl.Int64))
    as_dict = {v: i for i, v in enumerate(ids)}
    for value in [*ids, probe]:
        assert lookup.index(value) == as_dict.get(value)
    assert lookup.index("not a number") is None
    assert lookup.raw(np.arange(len(ids))) == ids


@given(st.lists(st.text(max_size=8), unique=True, max_size=50), st.text(max_size=8))
def test_text_ids_map_both_ways(ids, probe):
    series = pl.Series(["padding", *ids], dtype=pl.String).slice(1)  # an offset into Arrow
    lookup = IdLookup(series)
    as_dict = {v: i for i, v in enumerate(ids)}
    for value in [*ids, probe]:
        assert lookup.index(value) == as_dict.get(value)
    assert lookup.raw(np.arange(len(ids))[::-1]) == ids[::-1]


def test_mapped_weights_equal_the_safetensors_reader(tmp_path):
    tensors = {
        "table": torch.randn(7, 3),
        "bias": torch.randn(5, dtype=torch.float64),
        "steps": torch.arange(4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path), metadata={"note": "kept out"})
    mapped, loaded = mapped_tensors(path), load_file(str(path))
    assert mapped.keys() == loaded.keys()
    for name, value in loaded.items():
        assert mapped[name].dtype == value.dtype and mapped[name].shape == value.shape
        np.testing.assert_array_equal(mapped[name], value)
        assert not mapped[name].flags.writeable  # a view of the file, not a copy


def test_versions_load_in_a_thread_that_yields_the_cores_without_starving(tmp_path):
    """The switch-window stalls were also CPU taken from the event loop by the loading
    thread, so it runs below the answering threads; but not at nice 19, where a busy host
    starved it (a promoted version unserved past a minute): a mild niceness, and SCHED_BATCH
    so that it never preempts them."""
    import os
    import threading

    from recsys.core.versions import VersionStore
    from serving.live import LOADER_NICENESS, LiveVersion

    live = LiveVersion(VersionStore(tmp_path))

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert live._loader.submit(niceness).result() == LOADER_NICENESS
    assert 0 < LOADER_NICENESS <= 5  # CFS weight >= 1/3 of a nice-0 thread's (nice 19: 1/68)
    assert live._loader.submit(os.sched_getscheduler, 0).result() == os.SCHED_BATCH
    assert niceness() != LOADER_NICENESS  # only that thread
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_property_tests_have_no_deadline():
    """A deadline is a timing assertion: on a slow machine it failed the lookup property
    above (DeadlineExceeded). The test profiles drop it; performance lives in make bench."""
    from hypothesis import settings

    assert settings().deadline is None
