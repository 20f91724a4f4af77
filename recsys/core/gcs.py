"""Google Cloud Storage's conditional read and write, for `ObjectStore` on `gs://`.

GCS has no `If-Match` on an upload; its equivalent is the object's *generation*: an
upload with `ifGenerationMatch=<g>` replaces the object only while its generation is
still `g`, and `ifGenerationMatch=0` creates it only if there is none (412 otherwise).
The ETag this module hands out is therefore the generation, read in the same response
as the bytes (`X-Goog-Generation`), so a read and the write that follows it name the
same object.

Credentials are Google's application-default credentials (`GOOGLE_APPLICATION_CREDENTIALS`
or the metadata server), as gcsfs finds them; `STORAGE_EMULATOR_HOST` points the client
at an emulator, and then no credentials are looked for.
"""

import json
import logging
import os
import uuid
from typing import Any

from recsys.core.errors import RecsysError


class GenerationMismatch(RecsysError):
    """GCS answered 412: the object's generation is no longer the one expected."""


def gcs_filesystem(timeout_seconds: float) -> Any:
    """A gcsfs filesystem whose every request gives up after the storage timeout. The plain
    `gcsfs.core.GCSFileSystem`: the package's default class first probes the bucket over
    gRPC for zonal features, which an emulator (or a firewall) turns into a minute's wait."""
    from gcsfs.core import GCSFileSystem

    # gcsfs logs a traceback when its retries run out; the caller turns that failure into
    # one StorageError line, so the traceback would be the same fault said twice.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None
    return GCSFileSystem(
        token=token,
        requests_timeout=timeout_seconds,
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def gcs_failures() -> tuple[type[Exception], ...]:
    """What a gcsfs call may raise when the store is unreachable or refuses it."""
    import aiohttp
    import requests
    from gcsfs.retry import HttpError
    from google.auth.exceptions import GoogleAuthError

    return (OSError, HttpError, aiohttp.ClientError, GoogleAuthError, requests.RequestException)


def _call(fs: Any, *args: Any, **kwargs: Any) -> Any:
    """One request with gcsfs's own retries, all of them within the storage timeout (gcsfs
    backs off for half a minute before it gives up on a store that cannot be reached)."""
    from fsspec.asyn import sync

    return sync(fs.loop, fs._call, *args, timeout=fs.requests_timeout, **kwargs)


def get_with_generation(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    """The object's bytes and its generation, from one response (FileNotFoundError if none)."""
    headers, data = _call(fs, "GET", "b/{}/o/{}", bucket, key, alt="media")
    generation = {k.lower(): v for k, v in headers.items()}.get("x-goog-generation")
    if generation is None:
        raise RecsysError(f"gs://{bucket}/{key}: the store sent no generation with the object")
    return bytes(data), str(generation)


def put_if_generation(fs: Any, bucket: str, key: str, data: bytes, generation: str | None) -> str:
    """Upload `data`; with `generation` ("0": create only), only while the object still has
    it. Returns the new generation; GenerationMismatch when the store answered 412.

    Multipart, not the simpler media upload: GCS checks the precondition on both, but
    fake-gcs-server (what the tests run against) only on multipart."""
    boundary = uuid.uuid4().hex
    metadata = json.dumps({"name": key}).encode()
    body = b"".join(
        (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
            metadata,
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    conditions = {} if generation is None else {"ifGenerationMatch": generation}
    try:
        reply = _call(
            fs,
            "POST",
            f"{fs._location}/upload/storage/v1/b/{bucket}/o",
            uploadType="multipart",
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=body,
            json_out=True,
            **conditions,
        )
    except FileExistsError as exc:  # gcsfs's word for 412
        raise GenerationMismatch(f"gs://{bucket}/{key} changed since it was read") from exc
    return str(reply["generation"])
