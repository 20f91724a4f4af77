"""Build settings from a TOML file: precedence (defaults < file < flags), clear errors,
the resolved settings stored in the version; `recsys tune` writes such a file."""

import re
import time
import tomllib
from pathlib import Path

import pytest
from helpers import recsys

from data.synthetic import SyntheticConfig, generate
from recsys.build_config import BuildConfig
from recsys.core.errors import RecsysError
from recsys.core.layout import BUILD_CONFIG as CONFIG_FILE
from recsys.core.versions import VersionStore
from training.config import LossKind, Similarity

pytestmark = pytest.mark.slow  # builds models or runs the service: `make test` only


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "build.toml"
    path.write_text(text)
    return path


def test_a_file_overrides_defaults_and_flags_override_the_file(tmp_path):
    path = write(
        tmp_path,
        '[train]\ntemperature = 0.2\nlosses = ["softmax", "triplet:0.5"]\nbatch_size = 512\n'
        '[tower]\nsimilarity = "dot"\nhidden_dim = 0\n[rebuild]\ngate = false\n',
    )
    config = BuildConfig.from_file(path)
    assert config.train.temperature == 0.2 and config.train.batch_size == 512
    assert config.train.losses == ((LossKind.SOFTMAX, 1.0), (LossKind.TRIPLET, 0.5))
    assert config.tower.similarity is Similarity.DOT and config.tower.hidden_dim == 0
    assert config.rebuild.gate is False
    assert config.train.patience == BuildConfig().train.patience  # untouched: the default
    flagged = config.with_overrides({"train": {"temperature": 0.07, "batch_size": None}})
    assert flagged.train.temperature == 0.07 and flagged.train.batch_size == 512


def test_the_resolved_settings_round_trip_through_toml(tmp_path):
    config = BuildConfig().with_overrides(
        {"train": {"logq_correction": 1.2, "losses": ["npair"]}, "index": {"max_query_ms": 4}}
    )
    again = BuildConfig.from_file(write(tmp_path, config.to_toml()))
    assert again == config
    assert again.index.max_query_ms == 4.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\ntemprature = 0.1\n", "unknown setting(s) temprature"),
        ("[trian]\ntemperature = 0.1\n", "unknown section [trian]"),
        ('[train]\ntemperature = "hot"\n', "[train] temperature: Input should be a valid number"),
        ("[train]\ntemperature = -1.0\n", "temperature: Input should be greater than 0"),
        ("[train]\nlogq_correction = -0.5\n", "logq_correction: Input should be greater than"),
        ("[train]\nquery_logq_correction = -1\n", "query_logq_correction: Input should be"),
        ('[train]\nlosses = ["hinge"]\n', "bad loss 'hinge'"),
        ("[rebuild]\ngate = 1\n", "gate: Input should be a valid boolean"),
        ("temperature = 0.1\n", "must be a [section]"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_files_fail_with_a_message_naming_the_problem(tmp_path, text, message):
    with pytest.raises(RecsysError, match=re.escape(message)):
        BuildConfig.from_file(write(tmp_path, text))


def test_a_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecsysError, match="cannot read"):
        BuildConfig.from_file(tmp_path / "nope.toml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    cfg = SyntheticConfig(rows=6_000, users=150, items=120, clusters=4, taste=0.9, seed=2)
    return generate(root / "data", cfg)


def test_build_reads_the_file_prints_and_stores_the_resolved_settings(tiny, tmp_path):
    path = write(
        tmp_path, "[train]\ntemperature = 0.2\nmax_epochs = 5\n[index]\nrecall_at_100 = 0.9\n"
    )
    artifacts = tmp_path / "artifacts"
    result = recsys(
        "build", "--data", tiny, "--artifacts", artifacts, "--config", path,
        "--epochs", "2", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "temperature = 0.2" in result.stderr and "max_epochs = 2" in result.stderr
    assert "[train]" in result.stderr and "[index]" in result.stderr  # printed as TOML
    stored = tomllib.loads((VersionStore(artifacts).current() / CONFIG_FILE).read_text())
    assert stored["train"]["temperature"] == 0.2
    assert stored["train"]["max_epochs"] == 2  # the flag beat the file
    assert stored["index"]["recall_at_100"] == 0.9


def test_build_with_a_bad_config_file_exits_2_without_a_traceback(tiny, tmp_path):
    path = write(tmp_path, "[train]\nepochs = 3\n")
    result = recsys("build", "--data", tiny, "--artifacts", tmp_path / "a", "--config", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown setting(s) epochs" in result.stderr and "max_epochs" in result.stderr


def test_tune_writes_a_config_that_build_accepts_within_its_budget(tiny, tmp_path):
    """No trial limit: the search runs to the budget, which the whole command keeps to
    within 10% (the interpreter's start-up, seconds of imports, counts: it once ran on
    top of the budget)."""
    out = tmp_path / "tuned.toml"
    started = time.monotonic()
    result = recsys("tune", "--data", tiny, "--budget-minutes", "0.5", "--out", out)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr  # progress bars on a terminal only, never in a log
    assert "trials" in result.stdout and "recall@20" in result.stdout
    assert 0.5 * 60 * 0.8 < seconds < 0.5 * 60 * 1.1
    tuned = BuildConfig.from_file(out)
    assert tuned.train.refit is True  # trials skip the refit; the written settings do not
    assert out.read_text().startswith("# recsys tune")


def test_tune_trials_train_one_member_as_wide_as_the_build_s():
    """A lone tower defaults to 256-d; a trial must train the 64-d member that a small
    log's four-member build would, or it tunes another model."""
    from types import SimpleNamespace

    from recsys.tune import member_tower
    from training.config import TowerConfig

    movielens = SimpleNamespace(num_users=943, num_items=1_682)
    member = member_tower(TowerConfig(), movielens, 80_000)  # type: ignore[arg-type]
    assert (member.members, member.embedding_dim) == (1, 64)
    large = SimpleNamespace(num_users=30_000, num_items=40_000)
    assert member_tower(TowerConfig(), large, 800_000).embedding_dim == 256  # type: ignore[arg-type]
    chosen = member_tower(TowerConfig(embedding_dim=32), movielens, 80_000)  # type: ignore[arg-type]
    assert chosen.embedding_dim == 32
