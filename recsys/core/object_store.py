"""Objects under a URL prefix (`s3://bucket/prefix`, `gs://bucket/prefix`,
`file:///srv/recsys`) through fsspec, with the one operation a plain filesystem interface
lacks: a conditional write.

A write with `expected=<etag>` replaces the object only if it still has that ETag; with
`expected=CREATE` it creates the object only if there is none. On S3 these are the
`If-Match` / `If-None-Match: *` headers of PutObject, checked by the store itself, so two
writers on different hosts cannot both win. On GCS the ETag is the object's generation and
the write carries `ifGenerationMatch` (`recsys.core.gcs`). On `file://` the same promise
comes from an advisory lock on a file beside the object, and the ETag is the content's
SHA-256.

The endpoint and credentials of S3 come from the standard AWS environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`),
read by botocore: any S3-compatible store works.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from recsys.core import gcs
from recsys.core.errors import RecsysError
from recsys.core.settings import Settings

CREATE = "*"  # `expected` of a write that must create the object
SUPPORTED = ("s3://", "gs://", "file://")


class PreconditionFailed(RecsysError):
    """A conditional write lost: the object changed (or appeared) since it was read."""


class StorageError(RecsysError):
    """The object store could not be reached or refused a request."""


def is_remote(location: str | Path) -> bool:
    """True for a URL (`s3://...`, `gs://...`, `file://...`); a plain path is a local
    artifacts root."""
    return "://" in str(location)


@dataclass(frozen=True)
class Stored:
    """An object's bytes and the ETag they had when read."""

    data: bytes
    etag: str


class ObjectStore:
    """Keys under one URL prefix; keys are '/'-separated and relative to it."""

    def __init__(self, url: str) -> None:
        if not url.startswith(SUPPORTED):
            raise RecsysError(
                f"{url}: artifacts on object storage must be s3://bucket/prefix, "
                "gs://bucket/prefix or file:///path (the schemes whose writes can be "
                "conditional)"
            )
        import fsspec

        self.url = url.rstrip("/")
        self.protocol = url.split("://", 1)[0]
        # s3fs caches listings by default; a poller must see what other hosts wrote.
        options: dict[str, Any] = {"use_listings_cache": False}
        if self.protocol == "s3":
            # Fail within seconds and let the caller's back-off retry (a host keeps its
            # version meanwhile), rather than block in nested retries for minutes.
            options.update(
                skip_instance_cache=True,
                config_kwargs={
                    "retries": {"max_attempts": 2, "mode": "standard"},
                    "connect_timeout": 5,
                    "read_timeout": Settings().storage_timeout_seconds,
                },
            )
        if self.protocol == "gs":
            self.fs = gcs.gcs_filesystem(Settings().storage_timeout_seconds)
        else:
            self.fs = fsspec.filesystem(self.protocol, **options)
        # What a call may raise when the store is unreachable or refuses it: OSError from
        # fsspec and s3fs, and botocore's own errors (no credentials, no endpoint).
        self.failures: tuple[type[Exception], ...] = (OSError,)
        if self.protocol == "gs":
            self.failures = gcs.gcs_failures()
        if self.protocol == "s3":
            from botocore.exceptions import BotoCoreError, ClientError

            self.fs.retries = 2  # s3fs's own retries, around botocore's
            self.failures = (OSError, BotoCoreError, ClientError)
        self.root = self.url.split("://", 1)[1]
        if self.protocol == "file":
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _call(self, what: str, key: str, action: Any) -> Any:
        try:
            return action()
        except (FileNotFoundError, PreconditionFailed):
            raise
        except self.failures as exc:
            raise StorageError(f"{self.url}: cannot {what} '{key}' ({_reason(exc)})") from exc

    def get(self, key: str) -> Stored | None:
        """The object and its ETag, or None when there is none."""
        if self.protocol == "file":
            target = Path(self.path(key))
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                return None
            return Stored(data, hashlib.sha256(data).hexdigest())

        def fetch() -> Stored:
            if self.protocol == "gs":
                return Stored(*gcs.get_with_generation(self.fs, *self._bucket_key(key)))
            reply = self.fs.call_s3("get_object", **self._s3_key(key))
            return Stored(_read_body(self.fs, reply["Body"]), str(reply["ETag"]))

        try:
            stored: Stored = self._call("read", key, fetch)
        except FileNotFoundError:
            return None
        return stored

    def put(self, key: str, data: bytes, expected: str | None = None) -> str:
        """Write `data`; with `expected`, only if the object still has that ETag (CREATE:
        only if there is none). Returns the new ETag; PreconditionFailed when it lost."""
        if self.protocol == "file":
            return self._put_file(key, data, expected)
        if self.protocol == "gs":
            return self._put_gcs(key, data, expected)
        extra: dict[str, str] = {}
        if expected == CREATE:
            extra["IfNoneMatch"] = "*"
        elif expected is not None:
            extra["IfMatch"] = expected
        try:
            reply = self.fs.call_s3("put_object", Body=data, **self._s3_key(key), **extra)
        except self.failures as exc:
            if _precondition_failed(exc):
                raise PreconditionFailed(f"{self.url}/{key} changed since it was read") from exc
            raise StorageError(f"{self.url}: cannot write '{key}' ({exc})") from exc
        return str(reply["ETag"])

    def _put_file(self, key: str, data: bytes, expected: str | None) -> str:
        target = Path(self.path(key))
        if expected is None:
            _replace(target, lambda handle: handle.write(data))
            return hashlib.sha256(data).hexdigest()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                now: str | None = hashlib.sha256(target.read_bytes()).hexdigest()
            except FileNotFoundError:
                now = None
            if (expected == CREATE and now is not None) or (expected != CREATE and now != expected):
                raise PreconditionFailed(f"{self.url}/{key} changed since it was read")
            _replace(target, lambda handle: handle.write(data))
        return hashlib.sha256(data).hexdigest()

    def _put_gcs(self, key: str, data: bytes, expected: str | None) -> str:
        generation = "0" if expected == CREATE else expected
        try:
            written: str = self._call(
                "write",
                key,
                lambda: gcs.put_if_generation(self.fs, *self._bucket_key(key), data, generation),
            )
        except gcs.GenerationMismatch as exc:
            raise PreconditionFailed(str(exc)) from exc
        return written

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, _, prefix = self.path(key).partition("/")
        return bucket, prefix

    def _s3_key(self, key: str) -> dict[str, str]:
        bucket, prefix = self._bucket_key(key)
        return {"Bucket": bucket, "Key": prefix}

    def upload(self, local: Path, key: str) -> None:
        if self.protocol == "file":  # whole or not at all, as an S3 PUT is
            with local.open("rb") as source:
                _replace(Path(self.path(key)), lambda handle: shutil.copyfileobj(source, handle))
            return
        self._call("upload", key, lambda: self.fs.put_file(str(local), self.path(key)))

    def download(self, key: str, local: Path) -> None:
        self._call("download", key, lambda: self.fs.get_file(self.path(key), str(local)))

    def exists(self, key: str) -> bool:
        return bool(self._call("look up", key, lambda: self.fs.exists(self.path(key))))

    def children(self, key: str) -> list[str]:
        """Names directly under `key` (empty when there is nothing)."""
        try:
            entries = self._call("list", key, lambda: self.fs.ls(self.path(key), detail=False))
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def files(self, key: str) -> list[str]:
        """Every object under `key`, as keys relative to `key`."""
        base = self.path(key).rstrip("/") + "/"
        try:
            found = self._call("list", key, lambda: self.fs.find(self.path(key)))
        except FileNotFoundError:
            return []
        return sorted(str(p).removeprefix(base) for p in found if str(p).startswith(base))

    def delete(self, key: str) -> None:
        """Delete one object (nothing if it is gone already)."""
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", key, lambda: self.fs.rm_file(self.path(key)))


def _replace(target: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write `target` through a temporary file beside it and one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    """What went wrong, in words even for a timeout, whose message is empty."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {Settings().storage_timeout_seconds:g} s"
    return str(exc)


def _read_body(fs: Any, body: Any) -> bytes:
    """Read an aiobotocore streaming body on fsspec's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body:
            return bytes(await body.read())

    return bytes(sync(fs.loop, read))


def _precondition_failed(exc: BaseException) -> bool:
    """Whether S3 answered 412 (or 409, a conditional write racing another one)."""
    response = getattr(exc, "response", None) or getattr(exc.__cause__, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
    return "pre-conditions you specified did not hold" in str(exc)
