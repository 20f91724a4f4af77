"""Every bound of a build setting is checked before any work starts, with one line and
exit 2 (issue 34, probe 11: a config file that is not UTF-8, `max_epochs = "abc"` or
`1.5`, a 20-digit seed, `embedding_dim = 5000000` and `keep_versions = 0` ended in
tracebacks, the last one after the version was promoted)."""

import re
from pathlib import Path

import pytest
from helpers import recsys

from recsys.build_config import BuildConfig
from recsys.core.errors import RecsysError

BAD = {
    "max_epochs": ('[train]\nmax_epochs = "abc"\n', r"\[train\] max_epochs: .*valid integer"),
    "max_epochs_float": ("[train]\nmax_epochs = 1.5\n", r"max_epochs: .*valid integer"),
    "max_epochs_bool": ("[train]\nmax_epochs = true\n", r"max_epochs: .*valid integer"),
    "max_epochs_zero": ("[train]\nmax_epochs = 0\n", r"max_epochs: .*greater than or equal to 1"),
    "seed": ("[train]\nseed = 12345678901234567890\n", "seed"),
    "width": ("[tower]\nembedding_dim = 5000000\n", r"embedding_dim: .*less than or equal to 4096"),
    "keep": ("[rebuild]\nkeep_versions = 0\n", r"keep_versions: .*greater than or equal to 1"),
    "keep_negative": ("[rebuild]\nkeep_versions = -1\n", r"keep_versions: .*greater than"),
    "batch": ('[train]\nbatch_size = "big"\n', r"batch_size: .*valid integer"),
    "margin": ("[rebuild]\ngate_margin = nan\n", r"gate_margin: .*finite"),
    "temperature_string": ('[train]\ntemperature = "0.1"\n', r"temperature: .*valid number"),
    "switch": ("[train]\nrefit = 1\n", r"refit: .*valid boolean"),
    "device": ('[compute]\ndevice = "tpu"\n', "device: Input should be 'cpu' or 'cuda'"),
    "nproc": ("[compute]\nnproc = 0\n", r"nproc: .*greater than or equal to 1"),
    "recall": ("[index]\nrecall_at_100 = 1.5\n", r"recall_at_100: .*less than or equal to 1"),
    "dropout": ("[tower]\nid_dropout = 1.0\n", r"id_dropout: .*less than 1"),
    "unknown": ("[train]\nmax_epoch = 3\n", r"unknown setting\(s\) max_epoch"),
    # Table widths FBGEMM cannot shard (local_cols=6 not divisible by 4 after ingest).
    "width_odd": ("[tower]\nembedding_dim = 6\n", r"embedding_dim: .*multiple of 4"),
    "width_one": ("[tower]\nembedding_dim = 1\n", r"embedding_dim: .*multiple of 4"),
    "id_width": ("[tower]\nid_dim = 6\nskip = false\n", r"id_dim: .*multiple of 4"),
    "feature_width": ("[tower]\nfeature_dim = 2\nskip = false\n", r"feature_dim: .*multiple"),
    # Validation measures 10, 20, 50 and 100 only; 0 patience trained no epoch.
    "eval_k": ("[train]\neval_k = 30\n", r"eval_k: .*10, 20, 50 or 100"),
    "eval_k_float": ("[train]\neval_k = 20.0\n", r"eval_k: .*one of 10, 20, 50, 100"),
    "patience": ("[train]\npatience = 0\n", r"patience: .*greater than or equal to 1"),
    # Weights that ended in a NaN loss after ingest.
    "loss_nan": ('[train]\nlosses = ["softmax:nan"]\n', r"losses need .*finite .*softmax:nan"),
    "loss_inf": (
        '[train]\nlosses = ["softmax", "triplet:inf"]\n',
        r"finite positive weight \(got triplet:inf\)",
    ),
    "event_huge": (
        "[train]\nevent_weights = {view = 1e300}\n",
        r"event_weights must be at most 1e\+06",
    ),
    "event_nan": ("[train]\nevent_weights = {view = nan}\n", r"event weights must be finite"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_setting_is_one_line_before_any_work(case, tmp_path: Path):
    text, message = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecsysError, match=message):
        BuildConfig.from_file(path)


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[train]\n# caf\xe9\nseed = 1\n".encode("latin-1"))
    with pytest.raises(RecsysError, match="not UTF-8"):
        BuildConfig.from_file(path)


@pytest.mark.parametrize("case", ["keep", "width", "max_epochs", "width_odd", "eval_k", "loss_nan"])
def test_the_cli_refuses_before_it_reads_the_log(case, tmp_path: Path):
    text, message = BAD[case]
    (tmp_path / "bad.toml").write_text(text)
    result = recsys(
        "build",
        "--data",
        tmp_path / "no-such-log",
        "--artifacts",
        tmp_path / "art",
        "--config",
        tmp_path / "bad.toml",
    )
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr) and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "art" / "versions").exists()


def test_keep_zero_as_a_flag_is_refused_too(tmp_path: Path):
    result = recsys(
        "build",
        "--data",
        tmp_path / "no-such-log",
        "--artifacts",
        tmp_path / "art",
        "--keep",
        "0",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--embedding-dim", "2"], "embedding_dim: Input should be a multiple of 4"),
        (["--set", "tower.embedding_dim=3"], "embedding_dim: Input should be a multiple of 4"),
        (["--set", "train.eval_k=30"], "eval_k: Input should be 10, 20, 50 or 100"),
        (["--set", "train.patience=0"], "patience: Input should be greater than or equal to 1"),
        (["--set", 'train.losses=["softmax:nan"]'], "finite"),
        (["--set", "train.event_weights={view=1e300}"], "at most 1e+06"),
        (["--event-weights", "view=inf"], "finite"),
    ],
)
def test_settings_that_failed_after_ingest_are_refused_before_it(given, message, tmp_path: Path):
    """Each of these passed the checks and failed in training (FBGEMM's width assertion, a
    KeyError on recall@30, a model never saved, a NaN loss)."""
    result = recsys("build", "--data", tmp_path / "none", "--artifacts", tmp_path / "a", *given)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "a" / "versions").exists()


def test_set_assignments_go_through_the_schema():
    settings = BuildConfig().with_assignments(
        [
            "train.max_epochs=5",
            "compute.device=cuda",
            "train.event_weights=purchase=1,view=0.1",
            'train.losses=["softmax", "triplet:0.5"]',
            "rebuild.gate=false",
        ]
    )
    assert settings.train.max_epochs == 5 and settings.compute.device == "cuda"
    assert settings.train.event_weights == {"purchase": 1.0, "view": 0.1}
    assert [kind.value for kind, _ in settings.train.losses] == ["softmax", "triplet"]
    assert settings.rebuild.gate is False
    for bad, message in [
        ("train.max_epochs=1.5", "max_epochs"),
        ("train.max_epoch=3", "unknown setting"),
        ("trian.max_epochs=3", "unknown section"),
        ("max_epochs=3", "SECTION.KEY=VALUE"),
        ("train.max_epochs", "SECTION.KEY=VALUE"),
        ("rebuild.gate=yes", "gate"),
    ]:
        with pytest.raises(RecsysError, match=re.escape(message)):
            BuildConfig().with_assignments([bad])


def test_the_docs_settings_table_is_the_schema():
    """docs/training.md lists every setting with its type and default as the schema
    holds them (`recsys settings --markdown` wrote it)."""
    table = recsys("settings", "--markdown")
    assert table.returncode == 0, table.stderr
    docs = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    rows = table.stdout.strip().splitlines()
    assert len(rows) > 40
    missing = [row for row in rows if row not in docs]
    assert not missing, f"docs/training.md is behind the schema: {missing[:3]}"


def _shop(tmp_path: Path) -> Path:
    import polars as pl

    data = tmp_path / "shop"
    data.mkdir()
    pl.DataFrame(
        {
            "customer": [f"c{i % 30}" for i in range(300)],
            "sku": [i % 150 for i in range(300)],
            "kind": ["view", "buy"] * 150,
            "channel": ["web"] * 300,
        }
    ).write_parquet(data / "interactions.parquet")
    pl.DataFrame(
        {
            "sku": list(range(150)),
            "duration_ms": [1_000 + 7_919 * i for i in range(150)],  # 150 values: a quantity
            "genre": ["rock|pop", "jazz"] * 75,
            "title": [f"song {i}" for i in range(150)],
            "shelf": [i % 3 for i in range(150)],
        }
    ).write_parquet(data / "items.parquet")
    return data


def test_dry_run_prints_settings_and_what_each_column_becomes(tmp_path: Path):
    data = _shop(tmp_path)
    result = recsys(
        "build",
        "--data",
        data,
        "--artifacts",
        tmp_path / "art",
        "--columns",
        "user_id=customer,item_id=sku,event=kind",
        "--set",
        "train.event_weights=buy=1,view=0.2",
        "--set",
        "train.max_epochs=2",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "max_epochs = 2" in result.stdout and "buy = 1.0" in result.stdout
    for expected in (
        "customer -> user_id │ user ID",
        "kind -> event │ event type (weights: buy=1, view=0.2",
        "channel │ not used",
        "(timestamp) │ absent",
        "duration_ms │ bucketed number feature",
        "genre │ multi-valued category feature (3 values)",
        "title │ not a feature: near-unique",
        "shelf │ category feature (3 values)",
    ):
        assert expected in text, (expected, result.stdout)
    assert not (tmp_path / "art").exists()


def test_dry_run_refuses_a_bad_set_in_one_line(tmp_path: Path):
    result = recsys(
        "build",
        "--data",
        _shop(tmp_path),
        "--artifacts",
        tmp_path / "art",
        "--set",
        "tower.embedding_dim=0",
        "--dry-run",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "[tower] embedding_dim: Input should be greater than or equal to 1" in result.stderr


def test_tune_reads_the_log_with_the_event_weights_and_trains_on_compute_device(
    tmp_path: Path, monkeypatch
):
    """`recsys tune` ingested without the event weights and ignored [compute] (issue 34,
    probe 11): the trials tuned a model the build would not train."""
    import recsys.tune as tune_module
    from features.sources import resolve_source
    from recsys.tune import tune

    seen: dict[str, object] = {}
    real_ingest, real_train = tune_module.ingest, tune_module.train

    def ingest(source, out, config=None, **kwargs):
        seen["event_weights"] = dict(config.event_weights) if config else {}
        return real_ingest(source, out, config, **kwargs)

    def train(*args, device=None, **kwargs):
        seen["device"] = device
        return real_train(*args, device=device, **kwargs)

    monkeypatch.setattr(tune_module, "ingest", ingest)
    monkeypatch.setattr(tune_module, "train", train)
    source = resolve_source(
        _shop(tmp_path), columns={"user_id": "customer", "item_id": "sku", "event": "kind"}
    )
    base = BuildConfig().with_assignments(
        ["train.event_weights=buy=1,view=0.2", "train.max_epochs=1", "compute.nproc=2"]
    )
    result = tune(source, 1.0, base, max_trials=1, progress=False)
    assert seen["event_weights"] == {"buy": 1.0, "view": 0.2}
    assert str(seen["device"]) == "cpu"
    assert result.best.compute.nproc == 2 and result.best.train.event_weights == {
        "buy": 1.0,
        "view": 0.2,
    }


def test_tune_refuses_a_device_it_cannot_train_on_in_one_line(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = recsys(
        "tune",
        "--data",
        _shop(tmp_path),
        "--columns",
        "user_id=customer,item_id=sku",
        "--budget-minutes",
        "0.5",
        "--out",
        tmp_path / "t.toml",
        "--set",
        "compute.device=cuda",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cuda" in result.stderr.lower() and not (tmp_path / "t.toml").exists()
