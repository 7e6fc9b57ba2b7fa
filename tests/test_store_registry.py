"""Registration and promotion against a real mlflow server (sqlite + S3 artifacts on SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from conftest import fixture_path
from reparam.errors import RegistryError
from reparam.report import Report
from reparam.store import registry
from reparam.store.promotion import promote
from reparam.store.sources import fetch

pytestmark = pytest.mark.servers

SRC = fixture_path("ckpt", "yolov9-t-dual-best.pt")
DEPLOY_PT = fixture_path("reference", "yolov9-t-dual-best-converted.pt")
DEPLOY_ONNX = fixture_path("reference", "yolov9-t-dual-best-converted.onnx")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


SRC_SHA = sha(SRC)
DEPLOY_SHA = sha(DEPLOY_PT)


def make_outputs(d: Path, *, onnx: bool = False, passed: bool = True, salt: str = "") -> tuple[Path, Report]:
    """A deploy output directory as the converter writes it (real files) and its report."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEPLOY_PT, d / "best.pt")
    arts = [{"name": "best.pt", "path": str(d / "best.pt"), "format": "pt", "sha256": DEPLOY_SHA,
             "bytes": DEPLOY_PT.stat().st_size}]  # fmt: skip
    if onnx:
        shutil.copyfile(DEPLOY_ONNX, d / "best.onnx")
        arts.append({"name": "best.onnx", "path": str(d / "best.onnx"), "format": "onnx",
                     "sha256": sha(DEPLOY_ONNX), "bytes": DEPLOY_ONNX.stat().st_size})  # fmt: skip
    report = {
        "status": "succeeded" if passed else "validation_failed",
        "validation": {"passed": passed, "max_abs_diff": 6.1e-5},
        "variant": "yolov9-t",
        "nc": 3,
        "params": {"before": 2_700_000, "after": 2_000_000},
        "source": {"uri": f"s3://ml-ckpts/traffic/best.pt{salt}", "sha256": SRC_SHA, "bytes": SRC.stat().st_size},
        "artifacts": arts,
        "deploy_sha256": DEPLOY_SHA,
        "timing": {"total_s": 12.5},  # the converter's key for the wall time (the run's duration_s metric)
    }
    (d / "report.json").write_text(json.dumps(report))
    return d, Report.from_dict(report)


def key(*salt) -> str:
    return registry.idempotency_key(SRC_SHA, {"variant": "yolov9-t", "fuse": True, "salt": salt})


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.tracking_uri)


@pytest.fixture
def fast_fail(monkeypatch):
    """No retries against a dead server (the default retry schedule takes minutes)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def test_register_new_version_with_tags_lineage_metrics_and_onnx_flavor(mlflow_server, client, tmp_path):
    name = f"traffic-deploy-{uuid.uuid4().hex[:6]}"
    out, report = make_outputs(tmp_path / "out", onnx=True)
    lineage = {"source_run_id": "a" * 32, "source_model_name": "traffic-dual", "source_model_version": "7"}
    k = key("onnx")
    reg = registry.register(name, out, report, tags={"team": "vision"}, lineage=lineage, idempotency_key=k,
                            tracking_uri=mlflow_server.tracking_uri)  # fmt: skip
    assert reg.created and reg.version == "1" and reg.model_uri == f"models:/{name}/1"
    mv = client.get_model_version(name, "1")
    t = mv.tags
    assert t["reparam.status"] == "ready" and t["reparam.validation_passed"] == "true"
    assert t["reparam.idempotency_key"] == k
    assert t["reparam.source_uri"] == "s3://ml-ckpts/traffic/best.pt"
    assert t["reparam.source_sha256"] == SRC_SHA and t["reparam.deploy_sha256"] == DEPLOY_SHA
    assert (t["reparam.variant"], t["reparam.nc"]) == ("yolov9-t", "3")
    assert (t["reparam.params_before"], t["reparam.params_after"]) == ("2700000", "2000000")
    assert float(t["reparam.max_abs_diff"]) == pytest.approx(6.1e-5)
    assert t["reparam.source_run_id"] == "a" * 32 and t["reparam.source_model_version"] == "7"
    assert t["team"] == "vision" and t["reparam.version"]
    # lineage: version -> conversion run -> logged model
    assert mv.run_id == reg.run_id and mv.source == f"models:/{reg.model_id}"
    run = client.get_run(reg.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["reparam.source_model_name"] == "traffic-dual"
    assert run.data.metrics == {"max_abs_diff": pytest.approx(6.1e-5), "params_before": 2.7e6, "params_after": 2e6,
                                "bytes_before": SRC.stat().st_size, "bytes_after": DEPLOY_PT.stat().st_size,
                                "duration_s": 12.5}  # fmt: skip
    lm = client.get_logged_model(reg.model_id)
    assert lm.source_run_id == reg.run_id and str(lm.status).endswith("READY")
    # the artifacts are the deploy outputs, byte for byte, shown as an ONNX-flavor model
    got = fetch(f"{reg.model_uri}/best.pt", tmp_path / "dl", tracking_uri=mlflow_server.tracking_uri)
    assert got.sha256 == DEPLOY_SHA
    got = fetch(f"{reg.model_uri}/best.onnx", tmp_path / "dl", tracking_uri=mlflow_server.tracking_uri)
    assert got.sha256 == sha(DEPLOY_ONNX)
    from mlflow.models import Model
    import mlflow.artifacts

    root = client.get_model_version_download_uri(name, reg.version)
    mlmodel = Model.load(mlflow.artifacts.download_artifacts(f"{root}/MLmodel", dst_path=str(tmp_path / "m"),
                                                             tracking_uri=mlflow_server.tracking_uri))  # fmt: skip
    assert mlmodel.flavors["onnx"]["data"] == "best.onnx"
    assert mlmodel.flavors["python_function"]["loader_module"] == "mlflow.onnx"
    assert mlmodel.model_id == reg.model_id
    # and MLflow's pyfunc (what `mlflow models serve` uses) serves the ONNX file
    import mlflow.pyfunc
    import numpy as np

    local = mlflow.artifacts.download_artifacts(root, dst_path=str(tmp_path / "full"),
                                                tracking_uri=mlflow_server.tracking_uri)
    pred = mlflow.pyfunc.load_model(local).predict({"images": np.zeros((1, 3, 640, 640), np.float32)})
    assert pred["output0"].shape == (1, 7, 8400)
    assert set(t["reparam.files"].split(",")) >= {"MLmodel", "best.pt", "best.onnx", "report.json"}


def test_same_key_returns_existing_version(mlflow_server, client, tmp_path):
    name = f"idem-{uuid.uuid4().hex[:6]}"
    out, report = make_outputs(tmp_path / "out")
    k = key("idem")
    first = registry.register(name, out, report, idempotency_key=k, tracking_uri=mlflow_server.tracking_uri)
    again = registry.register(name, out, report, idempotency_key=k, tracking_uri=mlflow_server.tracking_uri)
    assert first.created and not again.created
    assert again.version == first.version and again.run_id == first.run_id
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    found = registry.find_existing(name, k, mlflow_server.tracking_uri)
    assert found["version"] == first.version and found["model_uri"] == first.model_uri
    assert registry.find_existing(name, key("other"), mlflow_server.tracking_uri) is None
    other = registry.register(name, out, report, idempotency_key=key("other"), tracking_uri=mlflow_server.tracking_uri)
    assert other.created and other.version == str(int(first.version) + 1)


def test_failed_validation_registers_nothing_and_moves_no_alias(mlflow_server, client, tmp_path):
    name = f"gate-{uuid.uuid4().hex[:6]}"
    out, report = make_outputs(tmp_path / "ok")
    v1 = registry.register(name, out, report, idempotency_key=key("v1"), tracking_uri=mlflow_server.tracking_uri)
    p = promote(name, v1.version, ["champion"], validation_passed=True, tracking_uri=mlflow_server.tracking_uri)
    assert p.aliases == ["champion"] and p.previous == {"champion": None}
    bad_out, bad = make_outputs(tmp_path / "bad", passed=False)
    with pytest.raises(RegistryError, match="validation did not pass"):
        registry.register(name, bad_out, bad, idempotency_key=key("bad"), tracking_uri=mlflow_server.tracking_uri)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    v2 = registry.register(name, out, report, idempotency_key=key("v2"), tracking_uri=mlflow_server.tracking_uri)
    p = promote(name, v2.version, ["champion"], validation_passed=False, tracking_uri=mlflow_server.tracking_uri)
    assert p.aliases == [] and "validation" in p.skipped_reason
    assert client.get_model_version_by_alias(name, "champion").version == v1.version
    # a version not marked ready is never promoted, whatever the caller says
    client.set_model_version_tag(name, v2.version, "reparam.status", "pending")
    p = promote(name, v2.version, ["champion"], validation_passed=True, tracking_uri=mlflow_server.tracking_uri)
    assert p.aliases == [] and "not ready" in p.skipped_reason
    assert client.get_model_version_by_alias(name, "champion").version == v1.version
    client.set_model_version_tag(name, v2.version, "reparam.status", "ready")
    p = promote(name, v2.version, ["champion", "prod"], validation_passed=True, tracking_uri=mlflow_server.tracking_uri)
    assert p.aliases == ["champion", "prod"] and p.previous == {"champion": v1.version, "prod": None}
    assert client.get_model_version_by_alias(name, "champion").version == v2.version


def test_concurrent_registrations_keep_both_versions_and_a_valid_alias(mlflow_server, client, tmp_path):
    name = f"race-{uuid.uuid4().hex[:6]}"
    results, errors = {}, []

    def convert(i: int) -> None:
        try:
            out, report = make_outputs(tmp_path / f"o{i}", salt=f"?run={i}")
            reg = registry.register(name, out, report, idempotency_key=key("race", i),
                                    tracking_uri=mlflow_server.tracking_uri)  # fmt: skip
            promote(name, reg.version, ["champion"], validation_passed=True, tracking_uri=mlflow_server.tracking_uri)
            results[i] = reg.version
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=convert, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors
    assert sorted(results.values()) == ["1", "2"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    assert all(v.tags["reparam.status"] == "ready" for v in versions)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version in ("1", "2") and champion.tags["reparam.validation_passed"] == "true"


def test_register_keeps_stdout_clean(mlflow_server, tmp_path, capfd):
    """The CLI's stdout is for its summary: MLflow's 'View run at <uri>' lines must not appear."""
    out, report = make_outputs(tmp_path / "out")
    capfd.readouterr()
    registry.register(f"quiet-{uuid.uuid4().hex[:6]}", out, report, idempotency_key=key("quiet"),
                      tracking_uri=mlflow_server.tracking_uri)  # fmt: skip
    assert capfd.readouterr().out == ""


def test_registry_unreachable_is_clear_and_redacted(tmp_path, closed_port, fast_fail):
    out, report = make_outputs(tmp_path / "out")
    with pytest.raises(RegistryError, match="find existing failed: cannot connect") as ei:
        registry.register("x", out, report, idempotency_key=key("down"),
                          tracking_uri=f"http://bob:pa55word@127.0.0.1:{closed_port}")  # fmt: skip
    assert "pa55word" not in str(ei.value)


def test_mlflow_down_mid_registration_leaves_nothing_half_done(mlflow_server_factory, tmp_path, monkeypatch, fast_fail):
    """The server dies between 'create model version' and 'mark version ready'."""
    from mlflow import MlflowClient

    server = mlflow_server_factory()
    name = "outage"
    out, report = make_outputs(tmp_path / "out")
    v1 = registry.register(name, out, report, idempotency_key=key("o1"), tracking_uri=server.tracking_uri)
    promote(name, v1.version, ["champion"], validation_passed=True, tracking_uri=server.tracking_uri)

    original = MlflowClient.set_model_version_tag

    def dies_first(self, name_, version, k, v):
        if k == "reparam.status" and v == "ready":
            server.stop()
        return original(self, name_, version, k, v)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", dies_first)
    with pytest.raises(RegistryError, match="mark version ready failed: cannot connect") as ei:
        registry.register(name, out, report, idempotency_key=key("o2"), tracking_uri=server.tracking_uri)
    assert server.env["AWS_SECRET_ACCESS_KEY"] not in str(ei.value)
    monkeypatch.undo()
    # inspect the server's own store directly: v2 exists but is not ready; the alias did not move
    direct = MlflowClient(server.backend_uri, registry_uri=server.backend_uri)
    versions = {str(v.version): v.tags.get("reparam.status") for v in direct.search_model_versions(f"name = '{name}'")}
    assert versions["1"] == "ready" and versions.get("2") in ("pending", "failed")
    assert str(direct.get_model_version_by_alias(name, "champion").version) == "1"
    assert registry.find_existing(name, key("o2"), server.backend_uri) is None
    assert promote(name, "2", ["champion"], True, tracking_uri=server.backend_uri).aliases == []


def test_default_local_sqlite_store_without_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out, report = make_outputs(tmp_path / "out")
    reg = registry.register("local-deploy", out, report, idempotency_key=key("local"))
    assert reg.created and (tmp_path / "mlruns" / "mlflow.db").exists()
    assert promote("local-deploy", reg.version, ["champion"], True).aliases == ["champion"]
    got = fetch("models:/local-deploy@champion", tmp_path / "dl")
    assert got.sha256 == DEPLOY_SHA and got.note and "best.pt" in got.note
