"""Every bound of a build setting is checked before any work starts, with one line and
exit 2 (issue 34, probe 11: a config file that is not UTF-8, `max_epochs = "abc"` or
`1.5`, a 20-digit seed, `embedding_dim = 5000000` and `keep_versions = 0` ended in
tracebacks, the last one after the version was promoted)."""

from pathlib import Path

import pytest
from helpers import recsys

from recsys.build_config import BuildConfig
from recsys.core.errors import RecsysError

BAD = {
    "max_epochs": ('[train]\nmax_epochs = "abc"\n', "max_epochs must be an integer"),
    "max_epochs_float": ("[train]\nmax_epochs = 1.5\n", "max_epochs must be an integer"),
    "max_epochs_zero": ("[train]\nmax_epochs = 0\n", "max_epochs must be between"),
    "seed": ("[train]\nseed = 12345678901234567890\n", "seed"),
    "width": ("[tower]\nembedding_dim = 5000000\n", "at most 4,096"),
    "keep": ("[rebuild]\nkeep_versions = 0\n", "keep_versions must be between 1"),
    "keep_negative": ("[rebuild]\nkeep_versions = -1\n", "keep_versions must be between 1"),
    "batch": ('[train]\nbatch_size = "big"\n', "batch_size must be an integer"),
    "margin": ("[rebuild]\ngate_margin = nan\n", "gate_margin"),
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


@pytest.mark.parametrize("case", ["keep", "width", "max_epochs"])
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
    assert message.split()[0] in result.stderr and "Traceback" not in result.stderr
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
