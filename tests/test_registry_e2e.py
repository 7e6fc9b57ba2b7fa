"""The issue's registry round trips and fault cases, through the real ``reparam`` command.

Every conversion runs ``python -m reparam.cli convert ... --register`` in a subprocess against the session's real
servers (SeaweedFS S3 gateway + ``mlflow server`` with artifacts proxied to it). The dual checkpoint of
the test fixtures is uploaded as an S3 object, as a run artifact and as a registered model version with an
alias; one conversion makes a new deploy version, which is downloaded back from MLflow and checked against the
reference output; every other URI form of the same bytes is then a no-op. Fault cases: S3 unreachable, wrong S3
secret, missing key, a failing validation, and the MLflow server going away between "create model version" and
"mark version ready" (cut by a small HTTP proxy in front of a dedicated server).

Conversions use ``--imgsz 160`` (validation size only; the reference check below is still at 640 px).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import fixture_path
from reparam import __version__, exitcodes

pytestmark = [pytest.mark.servers, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CKPT = fixture_path("ckpt", "yolov9-t-dual-best.pt")
INPUT = fixture_path("reference", "input-640.safetensors")
REFERENCE = fixture_path("reference", "yolov9-t-dual-best-io.safetensors")

#: sent as MLflow basic-auth credentials (the test server ignores them); must never be printed
TRACKING_PASSWORD = "e2e-tracking-pass-7c1f93"
CONVERT_ARGS = ("--alias", "champion", "--tag", "team=vision", "--imgsz", "160", "--json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CKPT_SHA = sha256(CKPT)


def cli_env(s3_server, **extra: str) -> dict[str, str]:
    """The environment of a ``reparam`` subprocess: ours minus AWS/MLflow settings, plus the servers'."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(s3_server.env())
    env.update({
        "PYTHONPATH": str(REPO / "src"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_TRACKING_USERNAME": "e2e",
        "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD,
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def reparam(*args: str, env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reparam.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def assert_no_secrets(*texts: str, s3_server) -> None:
    for text in texts:
        assert s3_server.secret_key not in text
        assert TRACKING_PASSWORD not in text


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("reparam: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def versions_of(client, name: str) -> dict[str, dict]:
    return {str(mv.version): dict(mv.tags or {}) for mv in client.search_model_versions(f"name = '{name}'")}


# --- sources: the same checkpoint bytes under every URI form --------------------------------------------------


@pytest.fixture(scope="module")
def sources(s3_server, mlflow_server, tmp_path_factory):
    """The dual checkpoint in S3, as run artifact ``weights/best.pt``, and as version 1 (alias ``candidate``) of a
    registered model; returns every URI form of it plus ids for the lineage checks."""
    import shutil

    from mlflow import MlflowClient

    tag = uuid.uuid4().hex[:8]
    key = f"e2e/{tag}/yolov9-t-dual-best.pt"
    s3_server.client().upload_file(str(CKPT), s3_server.bucket, key)

    c = MlflowClient(mlflow_server.tracking_uri)
    exp = c.create_experiment(f"e2e-train-{tag}")
    run = c.create_run(exp, tags={"mlflow.runName": "train_dual"})
    weights = tmp_path_factory.mktemp("weights")
    shutil.copyfile(CKPT, weights / "best.pt")
    c.log_artifact(run.info.run_id, str(weights / "best.pt"), "weights")
    c.set_terminated(run.info.run_id)

    name = f"traffic-dual-{tag}"
    c.create_registered_model(name)
    lm = c.create_logged_model(exp, name="traffic-dual", source_run_id=run.info.run_id)
    c.log_model_artifacts(lm.model_id, str(weights))
    c.finalize_logged_model(lm.model_id, "READY")
    mv = c.create_model_version(name, f"models:/{lm.model_id}", run_id=run.info.run_id, model_id=lm.model_id)
    assert str(mv.version) == "1"
    c.set_registered_model_alias(name, "candidate", mv.version)

    artifact_root = c.get_run(run.info.run_id).info.artifact_uri
    assert artifact_root.startswith("mlflow-artifacts:/")
    proxied = artifact_root[len("mlflow-artifacts:/") :].lstrip("/")
    return {
        "s3": f"s3://{s3_server.bucket}/{key}",
        "runs": f"runs:/{run.info.run_id}/weights/best.pt",
        "models_version": f"models:/{name}/1",
        "models_alias": f"models:/{name}@candidate",
        "http": f"{mlflow_server.tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{proxied}/weights/best.pt",
        "name": name,
        "run_id": run.info.run_id,
        "model_id": lm.model_id,
        "s3_key": key,
        "tag": tag,
    }


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.tracking_uri)


@pytest.fixture(scope="module")
def first(sources, s3_server, mlflow_server, tmp_path_factory):
    """One real conversion: ``models:/<src>@candidate`` -> new version 1 of a fresh deploy model, alias champion."""
    deploy = f"traffic-deploy-{sources['tag']}"
    term = tmp_path_factory.mktemp("term") / "termination-log"
    proc = reparam("convert", sources["models_alias"], "--register", deploy, *CONVERT_ARGS,
                   "--tracking-uri", mlflow_server.tracking_uri, "--termination-log", str(term),
                   env=cli_env(s3_server))  # fmt: skip
    assert proc.returncode == exitcodes.OK, proc.stderr
    return {"deploy": deploy, "proc": proc, "report": json.loads(proc.stdout), "term": json.loads(term.read_text())}


# --- round trips ----------------------------------------------------------------------------------------------


def test_conversion_registers_a_version_that_loads_and_matches_the_reference(first, sources, client, s3_server,
                                                                             tmp_path):  # fmt: skip
    import mlflow.artifacts
    import torch
    from safetensors.torch import load_file

    from reparam.converter.artifacts import load_safetensors
    from reparam.converter.safe_load import load_pickle
    from reparam.converter.validation import count_params, main_output

    deploy, report = first["deploy"], first["report"]
    reg = report["registry"]
    assert reg["existing"] is False and reg["version"] == "1" and reg["model_uri"] == f"models:/{deploy}/1"
    assert reg["aliases"] == ["champion"] and reg["previous_aliases"] == {"champion": None}
    assert report["source"]["sha256"] == CKPT_SHA and report["source"]["kind"] == "models"
    assert first["term"]["outcome"] == "succeeded" and first["term"]["exitCode"] == 0
    assert first["term"]["modelName"] == deploy and first["term"]["version"] == "1"
    assert first["term"]["aliases"] == ["champion"] and first["term"]["deploySha256"] == report["deploy_sha256"]
    assert_no_secrets(first["proc"].stdout, first["proc"].stderr, json.dumps(first["term"]), s3_server=s3_server)

    # the alias points at the new version
    assert str(client.get_model_version_by_alias(deploy, "champion").version) == "1"

    # the version's artifacts, downloaded back from MLflow (through the server's artifact proxy)
    got = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(deploy, "1"), dst_path=str(tmp_path / "dl"),
        tracking_uri=client.tracking_uri))  # fmt: skip
    pts, sts = sorted(got.rglob("*.pt")), sorted(got.rglob("*.safetensors"))
    assert len(pts) == 1 and len(sts) == 1, sorted(p.name for p in got.rglob("*"))
    assert (got / "MLmodel").is_file()
    assert json.loads((got / "report.json").read_text())["deploy_sha256"] == sha256(pts[0])

    model = load_safetensors(sts[0])
    x = load_file(str(INPUT))["input"]
    with torch.no_grad():
        y = main_output(model(x))
    ref = load_file(str(REFERENCE))["converted.y"]
    assert y.shape == ref.shape == (1, 7, 8400)
    assert (y - ref).abs().max().item() <= 1e-4

    raw = load_pickle(pts[0])
    assert set(raw.obj) == {"model", "optimizer", "best_fitness", "ema", "updates", "opt", "git", "date", "epoch"}
    assert raw.obj["epoch"] == -1 and raw.obj["optimizer"] is None and raw.obj["ema"] is None
    assert "models.yolo.DetectionModel" in raw.globals and "models.yolo.DualDDetect" not in raw.globals

    # the version's tags
    tags = client.get_model_version(deploy, "1").tags
    assert tags["reparam.status"] == "ready" and tags["reparam.validation_passed"] == "true"
    assert tags["reparam.source_uri"] == sources["models_alias"]
    assert tags["reparam.source_sha256"] == CKPT_SHA
    assert tags["reparam.deploy_sha256"] == sha256(pts[0]) == report["deploy_sha256"]
    assert tags["reparam.variant"] == "yolov9-t" and tags["reparam.nc"] == "3"
    assert int(tags["reparam.params_after"]) == count_params(model) == report["params"]["after"]
    assert int(tags["reparam.params_before"]) == report["params"]["before"] > count_params(model)
    assert float(tags["reparam.max_abs_diff"]) == report["validation"]["max_abs_diff"] <= 1e-4
    assert tags["reparam.version"] == __version__
    assert tags["team"] == "vision"
    assert tags["reparam.source_model_name"] == sources["name"]
    assert tags["reparam.source_model_version"] == "1"
    assert tags["reparam.source_model_alias"] == "candidate"
    assert tags["reparam.source_run_id"] == sources["run_id"]
    assert tags["reparam.source_model_id"] == sources["model_id"]
    assert tags["reparam.source_artifact_path"] == "best.pt"
    assert_no_secrets(json.dumps(tags), s3_server=s3_server)


@pytest.mark.parametrize("form", ["models_alias", "models_version", "runs", "http", "s3"])
def test_same_source_and_settings_again_is_a_noop(form, first, sources, client, mlflow_server, s3_server, tmp_path):
    """The same bytes under every URI form, same settings: exit 0, no new version, the alias stays."""
    deploy = first["deploy"]
    before = versions_of(client, deploy)
    term = tmp_path / "term"
    proc = reparam("convert", sources[form], "--register", deploy, *CONVERT_ARGS,
                   "--tracking-uri", mlflow_server.tracking_uri, "--termination-log", str(term),
                   env=cli_env(s3_server))  # fmt: skip
    assert proc.returncode == exitcodes.OK, proc.stderr
    report = json.loads(proc.stdout)
    assert report["source"]["sha256"] == CKPT_SHA
    assert report["source"]["kind"] == form.split("_")[0]
    lineage = {
        "models_alias": {"source_model_name": sources["name"], "source_model_version": "1",
                         "source_model_alias": "candidate", "source_run_id": sources["run_id"],
                         "source_model_id": sources["model_id"], "source_artifact_path": "best.pt"},
        "models_version": {"source_model_name": sources["name"], "source_model_version": "1",
                           "source_run_id": sources["run_id"], "source_model_id": sources["model_id"],
                           "source_artifact_path": "best.pt"},
        "runs": {"source_run_id": sources["run_id"], "source_artifact_path": "weights/best.pt"},
    }.get(form, {})  # fmt: skip
    assert report["source"]["lineage"] == lineage
    assert report["registry"]["existing"] is True and report["registry"]["version"] == "1"
    assert report["deploy_sha256"] == first["report"]["deploy_sha256"]
    assert "layers" not in report  # nothing was converted
    assert versions_of(client, deploy) == before
    assert str(client.get_model_version_by_alias(deploy, "champion").version) == "1"
    summary = json.loads(term.read_text())
    assert summary["outcome"] == "succeeded" and summary["version"] == "1"
    assert_no_secrets(proc.stdout, proc.stderr, s3_server=s3_server)


def test_failing_validation_moves_no_alias(first, sources, client, mlflow_server, s3_server, tmp_path):
    """``--fuse --atol 1e-12``: the fused model differs by ~6e-5, so validation fails: exit 3, nothing registered."""
    deploy = first["deploy"]
    before = versions_of(client, deploy)
    term = tmp_path / "term"
    proc = reparam("convert", sources["s3"], "--register", deploy, *CONVERT_ARGS, "--fuse", "--atol", "1e-12",
                   "--tracking-uri", mlflow_server.tracking_uri, "--termination-log", str(term),
                   env=cli_env(s3_server))  # fmt: skip
    assert proc.returncode == exitcodes.VALIDATION_FAILED, proc.stderr
    line = one_error_line(proc)
    assert "validation failed: fused model" in line and "--atol" in line, line
    after = versions_of(client, deploy)
    assert after == before and [v for v, t in after.items() if t.get("reparam.status") == "ready"] == ["1"]
    assert str(client.get_model_version_by_alias(deploy, "champion").version) == "1"
    summary = json.loads(term.read_text())
    assert summary["outcome"] == "validation_failed" and summary["exitCode"] == exitcodes.VALIDATION_FAILED
    assert summary["reason"] == "ValidationFailed" and "version" not in summary and "modelUri" not in summary
    assert summary["maxAbsDiff"] > 1e-12
    assert_no_secrets(proc.stdout, proc.stderr, term.read_text(), s3_server=s3_server)


# --- source faults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["unreachable", "wrong_secret", "missing_key"])
def test_s3_faults_are_one_clear_line_and_exit_4(fault, sources, client, mlflow_server, s3_server, closed_port,
                                                 tmp_path):  # fmt: skip
    uri, extra = sources["s3"], {}
    if fault == "unreachable":
        extra = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed_port}",
                 "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}"}  # fmt: skip
    elif fault == "wrong_secret":
        extra = {"AWS_SECRET_ACCESS_KEY": "wrong-" + s3_server.secret_key[::-1]}
    else:
        uri = f"s3://{s3_server.bucket}/e2e/{sources['tag']}/no-such-checkpoint.pt"
    deploy = f"traffic-fault-{sources['tag']}"
    term = tmp_path / "term"
    proc = reparam("convert", uri, "--register", deploy, *CONVERT_ARGS, "--tracking-uri", mlflow_server.tracking_uri,
                   "--termination-log", str(term), env=cli_env(s3_server, **extra))  # fmt: skip
    assert proc.returncode == exitcodes.SOURCE_ERROR, proc.stderr
    line = one_error_line(proc)
    expected = {"unreachable": f"cannot reach S3 endpoint http://127.0.0.1:{closed_port}",
                "wrong_secret": "access denied", "missing_key": "no such object"}[fault]  # fmt: skip
    assert expected in line and uri in line
    assert proc.stdout == ""
    summary = json.loads(term.read_text())
    assert summary["outcome"] == "failed" and summary["reason"] == "SourceError"
    assert_no_secrets(proc.stdout, proc.stderr, term.read_text(), s3_server=s3_server)
    assert extra.get("AWS_SECRET_ACCESS_KEY", "<none>") not in proc.stderr + term.read_text()
    assert client.search_registered_models(f"name = '{deploy}'") == []  # nothing registered


# --- MLflow down mid-registration -----------------------------------------------------------------------------


class CuttingProxy(http.server.ThreadingHTTPServer):
    """An HTTP reverse proxy to an mlflow server that, on the first request matching ``cut_when``, stops the
    server (``on_cut``) and drops the connection; every later request is dropped too (server gone)."""

    daemon_threads = True

    def __init__(self, upstream: str, cut_when, on_cut):
        self.upstream = urlsplit(upstream)
        self.cut_when, self.on_cut = cut_when, on_cut
        self.cut = threading.Event()
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        srv: CuttingProxy = self.server  # type: ignore[assignment]
        body = self._body()
        srv.seen.append(f"{self.command} {self.path}")
        if not srv.cut.is_set() and srv.cut_when(self.command, self.path, body):
            srv.on_cut()
            srv.cut.set()
        if srv.cut.is_set():
            self.close_connection = True
            return  # no answer: the client sees the connection dropped
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "transfer-encoding", "connection")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(srv.upstream.hostname, srv.upstream.port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


def test_mlflow_down_mid_registration_leaves_nothing_half_registered(mlflow_server_factory, s3_server, tmp_path):
    """The registry disappears after the new version was created but before it was marked ready: exit 5, the error
    names the step, and the server's own store shows no new ready version and the alias where it was."""
    from mlflow import MlflowClient

    server = mlflow_server_factory()
    deploy = "traffic-deploy-outage"
    # version 1, ready and validated, holding the alias (made directly: the conversion under test is the second)
    c = MlflowClient(server.tracking_uri)
    c.create_registered_model(deploy)
    v1 = c.create_model_version(deploy, "s3://nowhere/v1", tags={"reparam.status": "ready",
                                                                   "reparam.validation_passed": "true"})  # fmt: skip
    c.set_registered_model_alias(deploy, "champion", v1.version)

    def marks_ready(method: str, path: str, body: bytes) -> bool:
        return path.endswith("/model-versions/set-tag") and b'"reparam.status"' in body and b'"ready"' in body

    proxy = CuttingProxy(server.tracking_uri, marks_ready, server.stop)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    term = tmp_path / "term"
    try:
        proc = reparam("convert", str(CKPT), "--register", deploy, *CONVERT_ARGS, "--tracking-uri", proxy.url,
                       "--termination-log", str(term),
                       env=cli_env(s3_server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))  # fmt: skip
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.cut.is_set(), proxy.seen
    assert proc.returncode == exitcodes.REGISTRY_ERROR, proc.stderr
    line = one_error_line(proc)
    assert f"register {deploy}: mark version ready failed" in line, line
    summary = json.loads(term.read_text())
    assert summary["outcome"] == "failed" and summary["reason"] == "RegistryError"
    assert "mark version ready" in summary["message"]
    assert_no_secrets(proc.stdout, proc.stderr, term.read_text(), s3_server=s3_server)

    # the server is gone; read its sqlite store directly
    assert server.proc.poll() is not None
    direct = MlflowClient(tracking_uri=server.backend_uri, registry_uri=server.backend_uri)
    versions = versions_of(direct, deploy)
    assert set(versions) == {"1", "2"}  # v2 was created; the cleanup could not reach the server
    assert versions["1"]["reparam.status"] == "ready"
    assert versions["2"]["reparam.status"] == "pending" and versions["2"]["reparam.source_sha256"] == CKPT_SHA
    assert str(direct.get_model_version_by_alias(deploy, "champion").version) == "1"
    assert {a: str(v) for a, v in direct.get_registered_model(deploy).aliases.items()} == {"champion": "1"}


def test_upload_draws_a_byte_progress_bar_and_keeps_the_folder_layout(client, mlflow_server, tmp_path, capsys):
    """The model folder goes up file by file (``log_model_artifact``, its folder as ``artifact_path``) with a
    progress bar in bytes on stderr (issue #17: a bar where a step is long); a real server gets the same layout."""
    import mlflow.artifacts

    from reparam.store.registry import _upload_model_dir

    src = tmp_path / "model"
    (src / "evaluation").mkdir(parents=True)
    (src / "m-converted.pt").write_bytes(b"w" * 300_000)
    (src / "MLmodel").write_text("flavors: {}\n")
    (src / "evaluation" / "pr_curve.png").write_bytes(b"p" * 1000)
    exp = client.create_experiment(f"upload-{tmp_path.name}")
    logged = client.create_logged_model(exp, name="upload-bar")
    done = _upload_model_dir(client, logged.model_id, src, progress=True)
    assert done == ["MLmodel", "evaluation/pr_curve.png", "m-converted.pt"]
    err = capsys.readouterr().err
    assert "uploading to the registry" in err and "100%" in err and "294k" in err.replace("K", "k")
    back = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.artifact_location,
                                                    dst_path=str(tmp_path / "back"),
                                                    tracking_uri=mlflow_server.tracking_uri))
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == sorted(done)
    assert (back / "m-converted.pt").read_bytes() == (src / "m-converted.pt").read_bytes()
