"""Versions on object storage, against a real S3 API (moto's server mode), a GCS API
(fake-gcs-server) and file://:
conditional writes, uploads whose manifest comes last, verified downloads, the cross-host
build lock, pruning that spares what hosts hold, and a host that keeps its version
through faults."""

import itertools
import json
import time
from pathlib import Path

import pytest
from helpers import S3Server

from recsys.core.errors import ArtifactError
from recsys.core.lock import BuildLockedError
from recsys.core.object_store import CREATE, ObjectStore, PreconditionFailed
from recsys.core.remote import MirroredStore, PromotionLost, RemoteVersions
from recsys.core.versions import VersionStore
from recsys.remote_artifacts import rollback
from serving.sync import SYNC_FAILURES, HostSync

_made = itertools.count()


def local_version(root: Path, payload: bytes = b"weights", gate: dict | None = None) -> str:
    """A committed version with a few files (no model: storage does not look inside);
    names sort in the order they were made, as build names do."""
    store = VersionStore(root)
    _, staging = store.stage()
    (staging / "model").mkdir()
    (staging / "model" / "weights.bin").write_bytes(payload * 1000)
    (staging / "index.ann").write_bytes(b"index" + payload)
    name = f"20260101T{next(_made):06d}Z-abcdef"
    store.commit(name, staging, {} if gate is None else {"gate": gate})
    return name


def published(remote: RemoteVersions, tmp_path: Path, payload: bytes) -> str:
    """A local version uploaded and made current; its name."""
    name = local_version(tmp_path / "a", payload)
    remote.upload(tmp_path / "a" / "versions" / name)
    remote.promote(name, remote.pointer())
    return name


@pytest.fixture(params=["s3", "gs", "file"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/shared"
    return str(request.getfixturevalue("gcs_bucket" if request.param == "gs" else "bucket"))


def test_conditional_writes_refuse_a_stale_etag_and_a_second_create(url: str) -> None:
    objects = ObjectStore(url)
    first = objects.put("current", b"v1", expected=CREATE)
    with pytest.raises(PreconditionFailed):
        objects.put("current", b"v1-again", expected=CREATE)
    second = objects.put("current", b"v2", expected=first)
    with pytest.raises(PreconditionFailed):
        objects.put("current", b"v3", expected=first)  # read before v2 was written
    stored = objects.get("current")
    assert stored is not None and stored.data == b"v2" and stored.etag == second


def test_a_version_is_invisible_until_its_manifest_is_uploaded(url: str, tmp_path: Path) -> None:
    remote = RemoteVersions(url)
    name = local_version(tmp_path / "a")
    version = tmp_path / "a" / "versions" / name
    remote.objects.upload(version / "index.ann", f"versions/{name}/index.ann")  # half uploaded
    assert remote.visible() == []
    with pytest.raises(ArtifactError, match="not stored"):
        remote.download(name, tmp_path / "host" / "versions")
    remote.upload(version)
    assert remote.visible() == [name]
    copy = remote.download(name, tmp_path / "host" / "versions")
    assert (copy / "model" / "weights.bin").read_bytes() == b"weights" * 1000


def test_a_tampered_version_is_never_renamed_into_place(url: str, tmp_path: Path) -> None:
    remote = RemoteVersions(url)
    name = local_version(tmp_path / "a")
    remote.upload(tmp_path / "a" / "versions" / name)
    remote.objects.put(f"versions/{name}/index.ann", b"something else")
    versions = tmp_path / "host" / "versions"
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        remote.download(name, versions)
    assert list(versions.iterdir()) == []  # no partial copy, no temporary directory


def test_a_version_deleted_during_the_download_fails_cleanly(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    remote = RemoteVersions(bucket)
    name = local_version(tmp_path / "a")
    remote.upload(tmp_path / "a" / "versions" / name)
    path = "/" + bucket.removeprefix("s3://") + f"/versions/{name}/"
    s3_server.faults[("GET", path + "index.ann")] = lambda: remote.delete(name)
    versions = tmp_path / "host" / "versions"
    with pytest.raises(ArtifactError, match="during the download"):
        remote.download(name, versions)
    assert list(versions.iterdir()) == []


def test_two_promotions_from_one_read_cannot_both_win(url: str, tmp_path: Path) -> None:
    remote = RemoteVersions(url)
    first, second = (local_version(tmp_path / side) for side in ("a", "b"))
    builds = []
    for side, name in (("a", first), ("b", second)):
        store = MirroredStore(tmp_path / side, remote, remote.pointer())
        store.remote.upload(store.versions / name)
        builds.append((store, name))
    builds[0][0].promote(builds[0][1])
    with pytest.raises(PromotionLost, match=f"{second} is stored but not current"):
        builds[1][0].promote(builds[1][1])
    assert remote.pointer().version == first
    assert set(remote.visible()) == {first, second}


def test_the_build_lock_holds_across_hosts_and_a_dead_holder_lease_runs_out(url: str) -> None:
    host_a, host_b = RemoteVersions(url), RemoteVersions(url)
    with host_a.build_lock():
        held_elsewhere = pytest.raises(BuildLockedError, match="another build is running")
        with held_elsewhere, host_b.build_lock():
            pass
    with host_b.build_lock():  # released: free again
        pass
    # A holder that died: its lease ran out, so the next build takes over.
    dead = {"host": "gone", "pid": 1, "started": "then", "expires": time.time() - 1}
    stored = host_a.objects.get("locks/build")
    assert stored is not None
    host_a.objects.put("locks/build", json.dumps(dead).encode(), expected=stored.etag)
    with host_b.build_lock():
        pass


def test_pruning_spares_the_current_version_and_what_hosts_hold(url: str, tmp_path: Path) -> None:
    remote = RemoteVersions(url)
    names = [local_version(tmp_path / "a", bytes([65 + n])) for n in range(4)]
    for name in names:
        remote.upload(tmp_path / "a" / "versions" / name)
    remote.promote(names[1], remote.pointer())
    remote.report_host("host-1", [names[0]], poll_seconds=2)
    remote.report_host("host-2", [names[2]], poll_seconds=0)  # a stale report: ignored
    stale = remote.objects.get("hosts/host-2.json")
    assert stale is not None
    old = {**json.loads(stale.data), "at": time.time() - 3600}
    remote.objects.put("hosts/host-2.json", json.dumps(old).encode())
    assert remote.prune(keep=1) == [names[2], names[3]]
    assert set(remote.visible()) == {names[0], names[1]}


def test_rollback_moves_current_back_to_the_version_that_served_before(
    url: str, tmp_path: Path
) -> None:
    remote = RemoteVersions(url)
    served = local_version(tmp_path / "a", b"1")
    rejected = local_version(tmp_path / "a", b"2", gate={"promoted": False})
    latest = local_version(tmp_path / "a", b"3", gate={"promoted": True})
    for name in (served, rejected, latest):
        remote.upload(tmp_path / "a" / "versions" / name)
    remote.promote(latest, remote.pointer())
    assert rollback(url, None) == (latest, served)  # the rejected one never served
    assert remote.pointer().version == served
    with pytest.raises(Exception, match="never served"):
        rollback(url, rejected)


def test_a_host_keeps_its_version_through_storage_faults_and_then_follows(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    remote = RemoteVersions(bucket)
    first = published(remote, tmp_path, b"1")
    host = tmp_path / "host"
    sync = HostSync(RemoteVersions(bucket), host, poll_seconds=0.1, host_id="h1")
    sync.once()
    assert VersionStore(host).current_name() == first

    second = published(remote, tmp_path, b"2")
    s3_server.faults[("GET", "/")] = 500  # the store answers nothing but errors
    before = SYNC_FAILURES.labels("storage")._value.get()
    waits = [sync.attempt() for _ in range(3)]
    assert VersionStore(host).current_name() == first  # kept, and still loadable
    assert (host / "versions" / first / "manifest.json").is_file()
    assert SYNC_FAILURES.labels("storage")._value.get() == before + 3
    assert waits[0] < waits[1] < waits[2]  # back-off, no reload loop
    s3_server.faults.clear()
    assert sync.attempt() == pytest.approx(0.1)
    assert VersionStore(host).current_name() == second
    assert set(VersionStore(host).list()) == {first, second}  # the previous one is kept


def test_a_half_uploaded_version_is_never_loaded_by_a_host(url: str, tmp_path: Path) -> None:
    remote = RemoteVersions(url)
    published(remote, tmp_path, b"1")
    # A pointer naming a version without a manifest (written by hand or an old tool).
    half = local_version(tmp_path / "a", b"2")
    remote.objects.upload(tmp_path / "a" / "versions" / half / "index.ann", f"versions/{half}/x")
    stored = remote.objects.get("current")
    assert stored is not None
    remote.objects.put("current", json.dumps({"version": half}).encode(), expected=stored.etag)
    host = tmp_path / "host"
    sync = HostSync(remote, host, poll_seconds=0.1, host_id="h1")
    sync.attempt()
    assert VersionStore(host).current_name() is None
    assert sync.failures == 1


def test_doctor_checks_object_storage_by_reading_and_writing_it(
    s3_server: S3Server, bucket: str
) -> None:
    from recsys.doctor import check_object_storage

    ok, detail = check_object_storage(bucket)()
    assert ok, detail
    assert "current is none yet" in detail
    s3_server.faults[("PUT", "/")] = 500
    ok, detail = check_object_storage(bucket)()
    assert not ok and "cannot write" in detail
    ok, detail = check_object_storage("ftp://host/path")()
    assert not ok and "s3://bucket/prefix, gs://bucket/prefix or file:///path" in detail


def test_no_credentials_or_no_endpoint_is_one_clear_storage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from recsys.core.object_store import StorageError

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StorageError, match=r"cannot read 'current'.*credentials"):
        RemoteVersions("s3://some-bucket/prefix").pointer()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens
    with pytest.raises(StorageError, match="Could not connect"):
        RemoteVersions("s3://some-bucket/prefix").pointer()
    with pytest.raises(StorageError):
        ObjectStore("s3://some-bucket/prefix").put("current", b"x", expected=CREATE)


def test_a_gcs_endpoint_that_cannot_be_reached_is_one_storage_error_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from recsys.core.object_store import StorageError

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")  # nothing listens
    monkeypatch.setenv("RECSYS_STORAGE_TIMEOUT_SECONDS", "2")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot read 'current' \(no answer within 2 s\)"):
        RemoteVersions("gs://some-bucket/prefix").pointer()
    with pytest.raises(StorageError, match="cannot write 'current'"):
        ObjectStore("gs://some-bucket/prefix").put("current", b"x", expected=CREATE)
    assert time.monotonic() - started < 30  # gcsfs alone backs off for over half a minute
    assert "Traceback" not in caplog.text


def test_a_store_that_hangs_fails_the_sync_within_the_timeout_and_the_host_keeps_its_version(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = RemoteVersions(bucket)
    first = published(remote, tmp_path, b"1")
    host = tmp_path / "host"
    monkeypatch.setenv("RECSYS_STORAGE_TIMEOUT_SECONDS", "0.5")
    sync = HostSync(RemoteVersions(bucket), host, poll_seconds=0.1, host_id="h1")
    sync.once()
    path = "/" + bucket.removeprefix("s3://") + "/current"
    s3_server.faults[("GET", path)] = 3.0  # every read of the pointer hangs for 3 s
    started = time.monotonic()
    wait = sync.attempt()
    assert sync.failures == 1 and wait >= 1.0
    assert time.monotonic() - started < 30  # bounded by the timeout and the few retries
    assert VersionStore(host).current_name() == first


def test_a_host_keeps_its_version_when_the_pointer_disappears(url: str, tmp_path: Path) -> None:
    remote = RemoteVersions(url)
    first = published(remote, tmp_path, b"1")
    host = tmp_path / "host"
    sync = HostSync(remote, host, poll_seconds=0.1, host_id="h1")
    sync.once()
    remote.objects.delete("current")  # deleted by hand, or a bucket being rebuilt
    sync.once()
    assert VersionStore(host).current_name() == first
    assert (host / "versions" / first).is_dir()


def test_a_restarted_host_keeps_the_previous_version_for_a_rollback(
    url: str, tmp_path: Path
) -> None:
    remote = RemoteVersions(url)
    names = [local_version(tmp_path / "a", bytes([49 + n])) for n in range(2)]
    host = tmp_path / "host"
    for name in names:
        remote.upload(tmp_path / "a" / "versions" / name)
        remote.promote(name, remote.pointer())
        HostSync(remote, host, poll_seconds=0.1, host_id="h1").once()
    restarted = HostSync(remote, host, poll_seconds=0.1, host_id="h1")
    restarted.once()
    assert set(VersionStore(host).list()) == set(names)
    assert remote.held_by_hosts() == set(names)


def test_rollback_of_a_local_directory_skips_rejected_versions(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    served = local_version(root, b"1")
    rejected = local_version(root, b"2", gate={"promoted": False})
    latest = local_version(root, b"3", gate={"promoted": True})
    VersionStore(root).promote(latest)
    assert rollback(str(root), None) == (latest, served)
    assert VersionStore(root).current_name() == served
    with pytest.raises(Exception, match="never served"):
        rollback(str(root), rejected)
    with pytest.raises(Exception, match="nothing to roll back to"):
        rollback(str(root), None)


def test_a_host_reports_what_it_holds_when_it_changes_not_on_every_poll(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    remote = RemoteVersions(bucket)
    first = published(remote, tmp_path, b"1")
    sync = HostSync(RemoteVersions(bucket), tmp_path / "host", poll_seconds=0.1, host_id="h1")
    path = "/" + bucket.removeprefix("s3://") + "/hosts/"

    def reports() -> int:
        return sum(1 for method, seen in s3_server.seen if method == "PUT" and path in seen)

    for _ in range(5):
        sync.once()
    assert reports() == 1
    second = published(remote, tmp_path, b"2")
    sync.once()
    assert reports() == 2
    assert remote.held_by_hosts() == {first, second}
