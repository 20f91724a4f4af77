"""One build over two "nodes" on this machine: two `recsys build` commands with their own
torchrun launchers, meeting over loopback (c10d rendezvous). Node 0 builds and writes the
version, node 1 trains its rank; a node killed mid-training fails the build on the other
in one line, well within the cluster timeout, and the current version stays."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import recsys

from data.synthetic import SyntheticConfig, generate
from recsys.core.versions import VersionStore
from recsys.processes import free_port, wait_listening

pytestmark = pytest.mark.slow  # model builds on several processes: `make test` only

TIMEOUT = 120  # --cluster-timeout: a failure must come well before it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multi-node")
    generate(root / "data", SyntheticConfig(rows=20_000, seed=3))
    return root / "data"


def _node(rank: int, artifacts: Path, port: int, *extra: object) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "recsys", "build", "--artifacts", str(artifacts)]
    command += ["--nnodes", "2", "--node-rank", str(rank)]
    command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--cluster-timeout", str(TIMEOUT)]
    command += [*map(str, extra)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def test_two_nodes_of_one_rank_build_one_version(data, tmp_path):
    artifacts, port = tmp_path / "artifacts", free_port()
    joining = _node(1, artifacts, port)
    building = _node(0, artifacts, port, "--data", data, "--epochs", 2, "--no-progress")
    _, err0 = building.communicate(timeout=900)
    out1, err1 = joining.communicate(timeout=300)
    assert building.returncode == 0, err0
    assert joining.returncode == 0, err1
    assert "node 1 of 2: its ranks trained" in out1
    manifest = json.loads((VersionStore(artifacts).current() / "manifest.json").read_text())
    assert manifest["train"]["ranks"] == 2
    held = manifest["train"]["sharding"]
    assert all(len(per_rank) == 2 for per_rank in held.values())
    assert sum(per_rank[1] for per_rank in held.values()) > 0  # node 1 held tables


@pytest.mark.parametrize("store_on", ["killed node", "surviving node"])
def test_a_node_killed_mid_training_fails_the_build_and_keeps_current(data, tmp_path, store_on):
    """The node whose launcher starts first hosts the meeting's store. Killed with it, the
    store takes the survivor's launcher down; kept alive on the survivor, only the killed
    node's ranks can end the build, and they must not outlive their launcher (torchrun
    starts them in sessions of their own, so a killed process group leaves them)."""
    artifacts = tmp_path / "artifacts"
    first = recsys("build", "--artifacts", artifacts, "--data", data, "--epochs", 1)
    assert first.returncode == 0, first.stderr
    current = VersionStore(artifacts).current_name()
    port = free_port()
    # Long training (no warm start, no early stop): the peer must die mid-training.
    building_flags = ["--from-scratch", "--epochs", 200, "--set", "train.patience=200"]
    building_flags += ["--no-gate", "--no-progress"]
    if store_on == "killed node":
        joining = _node(1, artifacts, port)
        wait_listening(port, 1, timeout=600)  # its launcher hosts the store
        building = _node(0, artifacts, port, *building_flags)
    else:
        building = _node(0, artifacts, port, *building_flags)
        wait_listening(port, 1, timeout=600)
        joining = _node(1, artifacts, port)
    deadline = time.monotonic() + 600
    while not list(artifacts.glob("versions/.staging-*/model/metrics.jsonl")):  # epoch 1 done
        assert building.poll() is None and time.monotonic() < deadline, building.stderr
        time.sleep(0.2)
    os.killpg(joining.pid, signal.SIGKILL)
    killed = time.monotonic()
    _, err = building.communicate(timeout=TIMEOUT * 3)
    assert building.returncode != 0
    assert time.monotonic() - killed < TIMEOUT  # the peer's closed sockets, not the timeout
    assert "distributed training on node 0 of 2" in err and "Traceback" not in err
    assert VersionStore(artifacts).current_name() == current
    assert not list(artifacts.glob("versions/.staging-*"))
    joining.communicate(timeout=60)


def test_bad_cluster_flags_are_one_line(tmp_path):
    for flags, expected in (
        (["--node-rank", "1"], "need --nnodes 2 or more"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "below --nnodes"),
        (["--nnodes", "2", "--rdzv-endpoint", "nohost"], "HOST:PORT"),
    ):
        done = recsys("build", "--artifacts", tmp_path, *flags)
        assert done.returncode == 2 and expected in done.stderr, (flags, done.stderr)
