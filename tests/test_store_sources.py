"""Fetching checkpoints from real stores: local, S3 (SeaweedFS), MLflow runs/models/artifact proxy."""

from __future__ import annotations

import hashlib
import shutil
import uuid

import pytest

from conftest import fixture_path
from reparam import exitcodes
from reparam.errors import InvalidInputError, SourceError
from reparam.store.sources import fetch

pytestmark = pytest.mark.servers


CKPT = fixture_path("ckpt", "yolov9-t-dual-best.pt")
CKPT_SHA = hashlib.sha256(CKPT.read_bytes()).hexdigest()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The process env pointing boto3 at the test gateway with the right keys."""
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="module")
def s3_ckpt(s3_server):
    key = f"traffic/{uuid.uuid4().hex[:8]}/best.pt"
    s3_server.client().upload_file(str(CKPT), s3_server.bucket, key)
    return f"s3://{s3_server.bucket}/{key}"


@pytest.fixture(scope="module")
def mlflow_sources(mlflow_server, tmp_path_factory):
    """The checkpoint as a run artifact, as a registered model version (+ alias), and a version with
    two *.pt candidates."""
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server.tracking_uri)
    exp = c.create_experiment(f"src-{uuid.uuid4().hex[:8]}")
    run = c.create_run(exp)
    w = tmp_path_factory.mktemp("weights")
    shutil.copy(CKPT, w / "best.pt")
    c.log_artifact(run.info.run_id, str(w / "best.pt"), "weights")
    c.set_terminated(run.info.run_id)

    name = f"traffic-dual-{uuid.uuid4().hex[:6]}"
    c.create_registered_model(name)
    d = tmp_path_factory.mktemp("mv")
    shutil.copy(CKPT, d / "best.pt")
    (d / "notes.txt").write_text("trained on shapes\n")
    lm = c.create_logged_model(exp, name="dual", source_run_id=run.info.run_id)
    c.log_model_artifacts(lm.model_id, str(d))
    c.finalize_logged_model(lm.model_id, "READY")
    mv = c.create_model_version(name, f"models:/{lm.model_id}", run_id=run.info.run_id, model_id=lm.model_id)
    c.set_registered_model_alias(name, "candidate", mv.version)

    shutil.copy(CKPT, d / "last.pt")
    lm2 = c.create_logged_model(exp, name="dual2")
    c.log_model_artifacts(lm2.model_id, str(d))
    c.finalize_logged_model(lm2.model_id, "READY")  # a PENDING logged model is refused (tests/test_registry_states.py)
    mv2 = c.create_model_version(name, f"models:/{lm2.model_id}", model_id=lm2.model_id)
    return {
        "run_id": run.info.run_id,
        "name": name,
        "version": mv.version,
        "model_id": lm.model_id,
        "multi_version": mv2.version,
        "tracking_uri": mlflow_server.tracking_uri,
    }


def test_local_is_hashed_not_copied(tmp_path):
    got = fetch(str(CKPT), tmp_path / "work", progress=False)
    assert got.path == CKPT.resolve()
    assert (got.sha256, got.bytes, got.kind) == (CKPT_SHA, CKPT.stat().st_size, "local")
    assert not (tmp_path / "work").exists()


def test_local_missing_is_invalid_input_not_a_source_outage(tmp_path):
    """A missing local file will not appear by retrying: bad input (exit 2), not an unreachable source (exit 4)."""
    with pytest.raises(InvalidInputError, match="does not exist") as err:
        fetch(str(tmp_path / "nope.pt"), tmp_path)
    assert err.value.exit_code == exitcodes.INVALID_INPUT == 2


def test_malformed_uri_and_sha_are_invalid_input(tmp_path):
    with pytest.raises(InvalidInputError, match="models:/<name>/<version>"):
        fetch("models:/only-a-name", tmp_path)
    with pytest.raises(InvalidInputError, match="64 hex"):
        fetch(str(CKPT), tmp_path, sha256="abc")


def test_s3_fetch_matches_sha_and_pin(s3_env, s3_ckpt, tmp_path):
    got = fetch(s3_ckpt, tmp_path, sha256=CKPT_SHA.upper(), progress=False)
    assert got.sha256 == CKPT_SHA
    assert got.bytes == CKPT.stat().st_size
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == CKPT_SHA
    assert got.path.parent == tmp_path and got.path.name == "best.pt"
    assert not list(tmp_path.glob("*.part"))


def test_s3_sha_mismatch_fails_and_removes_download(s3_env, s3_ckpt, tmp_path):
    wrong = "0" * 64
    with pytest.raises(SourceError, match="sha256") as ei:
        fetch(s3_ckpt, tmp_path, sha256=wrong, progress=False)
    assert CKPT_SHA in str(ei.value) and wrong in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_s3_progress_bar_only_when_asked(s3_env, s3_ckpt, tmp_path, capsys):
    fetch(s3_ckpt, tmp_path / "a", progress=False)
    assert capsys.readouterr().err == ""
    fetch(s3_ckpt, tmp_path / "b", progress=True)
    err = capsys.readouterr().err
    assert "best.pt" in err and "100%" in err
    fetch(s3_ckpt, tmp_path / "c")  # None -> stderr is not a tty under pytest capture
    assert capsys.readouterr().err == ""


def test_s3_missing_key(s3_env, s3_server, tmp_path):
    with pytest.raises(SourceError, match="no such object"):
        fetch(f"s3://{s3_server.bucket}/traffic/missing.pt", tmp_path)


def test_s3_wrong_credentials_rejected_and_not_shown(s3_env, s3_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-42")
    with pytest.raises(SourceError, match="access denied") as ei:
        fetch(s3_ckpt, tmp_path)
    msg = str(ei.value)
    assert "wrong-secret-value-42" not in msg and s3_env.access_key not in msg
    assert list(tmp_path.iterdir()) == []


def test_s3_unreachable(s3_env, s3_ckpt, tmp_path, monkeypatch, closed_port):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(SourceError, match="cannot reach S3 endpoint"):
        fetch(s3_ckpt, tmp_path)


def test_run_artifact(mlflow_sources, tmp_path):
    uri = f"runs:/{mlflow_sources['run_id']}/weights/best.pt"
    got = fetch(uri, tmp_path, tracking_uri=mlflow_sources["tracking_uri"], sha256=CKPT_SHA, progress=False)
    assert got.sha256 == CKPT_SHA and hashlib.sha256(got.path.read_bytes()).hexdigest() == CKPT_SHA
    assert got.lineage == {"source_run_id": mlflow_sources["run_id"], "source_artifact_path": "weights/best.pt"}
    # a directory holding a single checkpoint is resolved to it
    got = fetch(f"runs:/{mlflow_sources['run_id']}/weights", tmp_path / "d",
                tracking_uri=mlflow_sources["tracking_uri"])
    assert got.sha256 == CKPT_SHA


def test_run_missing_artifact_and_run(mlflow_sources, tmp_path):
    with pytest.raises(SourceError, match="no artifact 'weights/nope.pt'"):
        fetch(f"runs:/{mlflow_sources['run_id']}/weights/nope.pt", tmp_path,
              tracking_uri=mlflow_sources["tracking_uri"])
    with pytest.raises(SourceError, match="look up run failed"):
        fetch(f"runs:/{'f' * 32}/weights/best.pt", tmp_path, tracking_uri=mlflow_sources["tracking_uri"])


def test_model_version_and_alias(mlflow_sources, tmp_path):
    m = mlflow_sources
    got = fetch(f"models:/{m['name']}/{m['version']}", tmp_path / "v", tracking_uri=m["tracking_uri"])
    assert got.sha256 == CKPT_SHA
    assert got.note and "best.pt" in got.note  # picked among best.pt + notes.txt, and says so
    assert got.lineage["source_model_name"] == m["name"]
    assert got.lineage["source_model_version"] == str(m["version"])
    assert got.lineage["source_run_id"] == m["run_id"]
    assert got.lineage["source_model_id"] == m["model_id"]
    got = fetch(f"models:/{m['name']}@candidate", tmp_path / "a", tracking_uri=m["tracking_uri"], sha256=CKPT_SHA)
    assert got.lineage["source_model_version"] == str(m["version"])
    assert got.lineage["source_model_alias"] == "candidate"


def test_model_missing_version_and_alias(mlflow_sources, tmp_path):
    m = mlflow_sources
    with pytest.raises(SourceError, match="look up model version failed"):
        fetch(f"models:/{m['name']}/99", tmp_path, tracking_uri=m["tracking_uri"])
    with pytest.raises(SourceError, match="resolve alias @nope failed"):
        fetch(f"models:/{m['name']}@nope", tmp_path, tracking_uri=m["tracking_uri"])


def test_model_with_several_checkpoints_lists_them(mlflow_sources, tmp_path):
    m = mlflow_sources
    uri = f"models:/{m['name']}/{m['multi_version']}"
    with pytest.raises(InvalidInputError, match="holds 2 checkpoints") as ei:
        fetch(uri, tmp_path, tracking_uri=m["tracking_uri"])
    assert "best.pt" in str(ei.value) and "last.pt" in str(ei.value)
    assert f"name one, e.g. {uri}/best.pt" in str(ei.value)  # the URI filled in, ready to paste
    got = fetch(uri + "/last.pt", tmp_path, tracking_uri=m["tracking_uri"])  # naming one resolves it
    assert got.sha256 == CKPT_SHA and got.lineage["source_artifact_path"] == "last.pt"


def test_http_via_mlflow_artifact_proxy(mlflow_sources, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_server.tracking_uri).get_run(mlflow_sources["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    path = run.info.artifact_uri[len("mlflow-artifacts:/") :].lstrip("/")
    url = f"{mlflow_server.tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{path}/weights/best.pt"
    got = fetch(url, tmp_path, sha256=CKPT_SHA, progress=False)
    assert got.sha256 == CKPT_SHA and got.kind == "http"
    # MLflow's proxy answers 500 for a missing object; the error says so in one line
    with pytest.raises(SourceError, match="download over HTTP failed: HTTP 500") as ei:
        fetch(url.replace("best.pt", "missing.pt"), tmp_path)
    assert "\n" not in str(ei.value) and mlflow_server.env["AWS_SECRET_ACCESS_KEY"] not in str(ei.value)
    assert not list(tmp_path.glob("missing.pt*"))


def test_http_credentials_redacted(tmp_path, closed_port):
    with pytest.raises(SourceError, match="cannot connect") as ei:
        fetch(f"http://alice:s3cr3tpass@127.0.0.1:{closed_port}/a/best.pt?X-Amz-Signature=deadbeef", tmp_path)
    assert "s3cr3tpass" not in str(ei.value) and "deadbeef" not in str(ei.value)
