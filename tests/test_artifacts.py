"""Manifests with checksums: written last, verified on read, paths confined."""

import json

import pytest

from recsys.core.artifacts import read_manifest, write_manifest
from recsys.core.errors import ArtifactError


def make(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "table.txt").write_text("rows")
    return write_manifest(tmp_path, {"kind": "test"})


def test_manifest_round_trip(tmp_path):
    written = make(tmp_path)
    assert set(written["checksums"]) == {"weights.bin", "sub/table.txt"}
    assert read_manifest(tmp_path)["kind"] == "test"


def test_flipped_byte_is_refused(tmp_path):
    make(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x03")
    with pytest.raises(ArtifactError, match=r"checksum mismatch for 'weights\.bin'"):
        read_manifest(tmp_path)


def test_missing_file_and_missing_manifest_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    make(tmp_path)
    (tmp_path / "sub" / "table.txt").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_manifest(tmp_path)


def test_manifest_path_outside_the_directory_is_refused(tmp_path):
    root = tmp_path / "version"
    root.mkdir()
    (tmp_path / "secret").write_text("x")
    manifest = {"checksums": {"../secret": "0" * 64}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside"):
        read_manifest(root)
