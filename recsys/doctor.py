"""`recsys doctor`: check the machine before blaming the code. Most TorchRec trouble users
report is a torch / fbgemm / torchrec mismatch, which a check names at once; the rest is a
Redis that does not answer or an artifacts directory that cannot be written.

Each check returns (ok, detail); the CLI prints one line per check."""

import importlib
import importlib.metadata
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from recsys.core.errors import RecsysError

# torch minor -> the fbgemm-gpu and torchrec minors built against it (known to load)
COMPATIBLE = {"2.13": ("1.8", "1.8")}

Check = tuple[str, Callable[[], tuple[bool, str]]]


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_versions() -> tuple[bool, str]:
    torch = _version("torch")
    fbgemm = _version("fbgemm-gpu-cpu", "fbgemm-gpu", "fbgemm-gpu-nightly-cpu")
    torchrec = _version("torchrec")
    found = f"torch {torch}, fbgemm-gpu {fbgemm}, torchrec {torchrec}"
    if None in (torch, fbgemm, torchrec):
        return False, f"{found}: install all three (see README, Installation)"
    assert torch is not None and fbgemm is not None and torchrec is not None
    wanted = COMPATIBLE.get(_minor(torch))
    if wanted is None:
        return False, f"{found}: no known-good fbgemm/torchrec for torch {_minor(torch)}"
    if (_minor(fbgemm), _minor(torchrec)) != wanted:
        return (
            False,
            f"{found}: torch {_minor(torch)} needs fbgemm-gpu {wanted[0]}.x "
            f"and torchrec {wanted[1]}.x",
        )
    return True, found


def check_imports() -> tuple[bool, str]:
    for module in ("torch", "fbgemm_gpu", "torchrec"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a mismatch shows as OSError / ImportError / RuntimeError
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            return False, f"import {module} failed: {type(exc).__name__}: {first}"
    import torch

    try:
        torch.ops.fbgemm.asynchronous_complete_cumsum  # noqa: B018 (the op must be registered)
    except (AttributeError, RuntimeError) as exc:
        return False, f"fbgemm operators are not registered ({exc})"
    return True, "torch, fbgemm_gpu and torchrec import; fbgemm operators registered"


def check_cuda() -> tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        from training.parallel import check_device

        gpus = f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
        try:
            check_device("cuda")
        except RecsysError as exc:
            return False, f"{gpus}, but {exc}"
        return True, gpus
    return True, "no GPU visible: training runs on the CPU (--device cpu)"


def check_redis(url: str | None) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        if not url:
            return True, "REDIS_URL unset: the service caches in process (LRU)"
        import redis

        try:
            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        except (redis.RedisError, ValueError) as exc:
            return False, f"no answer from REDIS_URL ({type(exc).__name__})"
        return True, "REDIS_URL answers PING"

    return check


def check_writable(directory: Path) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        """Never creates the directory: a mistyped path would look fine and be left
        behind (`recsys build` creates it)."""
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            return False, f"{directory}: {problem} (recsys build --artifacts creates it)"
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-") as handle:
                handle.write(b"ok")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            return False, f"{directory}: cannot write ({exc.strerror})"
        return True, f"{directory}: writable"

    return check


def check_object_storage(url: str) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        """Reads the pointer and writes a scratch object: what builds and hosts do."""
        from recsys.core.errors import RecsysError
        from recsys.core.remote import RemoteVersions

        try:
            remote = RemoteVersions(url)
            pointer = remote.pointer()
            remote.objects.put(".doctor", b"ok")
            remote.objects.delete(".doctor")
        except RecsysError as exc:
            return False, str(exc)
        return True, f"{url}: readable and writable; current is {pointer.version or 'none yet'}"

    return check


def checks(artifacts: str, redis_url: str | None) -> list[Check]:
    from recsys.core.object_store import is_remote

    where = check_object_storage(artifacts) if is_remote(artifacts) else None
    return [
        ("versions", check_versions),
        ("imports", check_imports),
        ("cuda", check_cuda),
        ("redis", check_redis(redis_url)),
        ("artifacts", where or check_writable(Path(artifacts))),
    ]
