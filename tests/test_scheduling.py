"""The cron line and the systemd unit in docs/operations.md, run as written (paths moved
into a temporary directory): a plain rebuild repeats the current version's inputs (the
item table included) and settings, and a candidate the gate rejects exits 3, the status
the unit counts as success."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import recsys

from recsys.core.versions import VersionStore, read_manifest

pytestmark = pytest.mark.slow  # builds models: `make test` only

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = (ROOT / "docs/operations.md").read_text()


def _documented(block: str) -> str:
    """The first fenced block of this kind in docs/operations.md."""
    found = re.search(rf"```{block}\n(.*?)```", OPERATIONS, re.S)
    assert found, f"no ```{block} block in docs/operations.md"
    return found.group(1)


def _moved(command: str, artifacts: Path, log: Path) -> str:
    return (
        command.replace("/opt/recsys", str(ROOT))
        .replace("/srv/recsys", str(artifacts))
        .replace("/var/log/recsys-nightly.log", str(log))
    )


def test_documented_schedules_rebuild_from_the_remembered_inputs(tmp_path):
    data = tmp_path / "shop"
    assert (
        recsys("data", "synth", "--out", data, "--rows", "8000", "--users", "300").returncode == 0
    )
    logs, items = tmp_path / "logs", tmp_path / "catalogue.parquet"
    (data / "items.parquet").rename(items)  # an item table outside the log's directory
    data.rename(logs)
    artifacts = tmp_path / "recsys"
    # Built once by hand; a gate margin of -50% rejects any candidate not 50% better.
    first = recsys(
        "build",
        "--data",
        logs,
        "--items",
        items,
        "--artifacts",
        artifacts,
        "--epochs",
        "1",
        "--gate-margin",
        "-0.5",
        "--no-progress",
    )
    assert first.returncode == 0, first.stderr
    store = VersionStore(artifacts)
    current = store.current_name()

    cron = _documented("cron").strip()
    schedule, _, command = cron.partition("/")
    assert len(schedule.split()) == 5, cron  # minute hour day month weekday
    done = subprocess.run(
        ["bash", "-c", _moved("/" + command, artifacts, tmp_path / "nightly.log")], check=False
    )
    assert done.returncode == 3  # rejected by the gate: the status cron mails
    assert store.current_name() == current
    assert "quality gate" in (tmp_path / "nightly.log").read_text()
    rejected = max(p.name for p in store.versions.iterdir() if not p.name.startswith("."))
    manifest = read_manifest(store.versions / rejected)
    inputs = manifest["settings"]["inputs"]
    assert (inputs["data"], inputs["items"], inputs["columns"]) == (str(logs), str(items), {})
    assert manifest["settings"]["train"]["max_epochs"] == 1  # the settings were repeated too
    spec = (store.versions / rejected / "model/model.json").read_text()
    assert '"item_categories": {}' not in spec  # trained with the item table's features

    unit = _documented("ini")
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    success = re.search(r"^SuccessExitStatus=(.*)$", unit, re.M)
    assert exec_start and success
    argv = shlex.split(_moved(exec_start.group(1), artifacts, tmp_path / "unused.log"))
    assert Path(argv[0]).is_file(), argv[0]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert str(done.returncode) in success.group(1).split(), done.stderr[-2000:]
    assert store.current_name() == current


def test_a_plain_rebuild_without_a_version_asks_for_data(tmp_path):
    result = recsys("build", "--artifacts", tmp_path / "empty")
    assert result.returncode == 2
    assert "--data is needed" in result.stderr
